"""Backbone: Qwen3 parity, MoT routing, KV cache.  Run: pytest tests/test_backbone.py"""

import re

import pytest
import torch

from repforce.backbone import (
    Block,
    KVCache,
    MoEFFN,
    RMSNorm,
    RoutedFFN,
    Transformer,
    _grouped_mm_runs_on_cpu,
    apply_rope,
    causal_mask,
    grouped_mm_ok,
    moe_loop_reference,
    rope_cos_sin,
)

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=48)


def tiny_backbone(n_experts=3, seed=0):
    torch.manual_seed(seed)
    model = Transformer(**TINY, n_experts=n_experts)
    model.init_weights()
    with torch.no_grad():  # make norms non-trivial so their parity is tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_rmsnorm_formula():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_()
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight, atol=1e-6)


def test_rope_is_relative():
    """<rope(q, m), rope(k, n)> depends on m - n only."""
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), 16, 10000.0)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), 16, 10000.0)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    assert torch.allclose(dot(5, 2), dot(13, 10), atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_matches_huggingface_qwen3():
    """Same weights by plain renaming (mlp.* -> mlp.experts.{e}.*) give the same hidden states as HF Qwen3Model."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen3Model(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ours = Transformer(**TINY, n_experts=3)
    mapped = {}
    for name, tensor in hf.state_dict().items():
        if ".mlp." in name:
            for e in range(3):
                mapped[re.sub(r"\.mlp\.", f".mlp.experts.{e}.", name)] = tensor
        else:
            mapped[name] = tensor
    ours.load_state_dict(mapped, strict=True)

    ids = torch.randint(0, 64, (2, 11))
    expected = hf(input_ids=ids).last_hidden_state
    pos = torch.arange(11).expand(2, 11)
    got = ours(ours.embed_tokens(ids), torch.randint(0, 3, (2, 11)), causal_mask(2, 11), pos)
    assert torch.allclose(got, expected, atol=1e-5)


def test_mot_with_identical_experts_equals_dense_block():
    torch.manual_seed(0)
    dense = Block(32, 4, 2, 16, 48, n_experts=1, eps=1e-6, layer_idx=0)
    mot = Block(32, 4, 2, 16, 48, n_experts=3, eps=1e-6, layer_idx=0)
    with torch.no_grad():
        for e in range(3):
            mot.mlp.experts[e].load_state_dict(dense.mlp.experts[0].state_dict())
        mot.self_attn.load_state_dict(dense.self_attn.state_dict())
    x, ids = torch.randn(2, 9, 32), torch.randint(0, 3, (2, 9))
    cos, sin = rope_cos_sin(torch.arange(9).expand(2, 9), 16, 10000.0)
    mask = causal_mask(2, 9)
    assert torch.allclose(mot(x, ids, cos, sin, mask), dense(x, torch.zeros_like(ids), cos, sin, mask), atol=1e-6)


def test_routing_sends_each_token_to_its_expert():
    torch.manual_seed(0)
    ffn = RoutedFFN(16, 24, n_experts=3)
    x, ids = torch.randn(3, 7, 16), torch.randint(0, 2, (3, 7))  # expert 2 gets nothing
    y = ffn(x, ids)
    ref = torch.stack([torch.stack([ffn.experts[ids[b, i]](x[b, i]) for i in range(7)]) for b in range(3)])
    assert torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()
    assert ffn.experts[2].gate_proj.weight.grad is None  # an idle expert is skipped entirely
    assert ffn.experts[0].gate_proj.weight.grad is not None
    ids[0, :3] = -1  # padding skips the FFN
    y = ffn(x, ids)
    assert torch.equal(y[0, :3], torch.zeros(3, 16)) and torch.allclose(y[1:], ref[1:], atol=1e-6)



def uneven_moe(seed=0):
    """A 6-expert top-2 bank fed x whose feature 0 is 1: its router column makes expert 0 the
    favourite and expert 5 never chosen, so the groups are uneven and one is empty."""
    torch.manual_seed(seed)
    moe = MoEFFN(16, 8, n_routed=6, top_k=2)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.gate.weight[:, 0] = torch.tensor([3.0, 1.5, 1.0, 0.5, 0.0, -100.0])
    x = torch.randn(3, 7, 16)
    x[..., 0] = 1.0
    return moe, x


MOE_IMPLS = ["padded", pytest.param("grouped", marks=pytest.mark.skipif(
    not _grouped_mm_runs_on_cpu(torch.float32), reason="this torch build has no CPU _grouped_mm"))]


@pytest.mark.parametrize("impl", MOE_IMPLS)
def test_moe_grouped_equals_loop(impl):
    moe, x = uneven_moe()
    counts = torch.bincount(moe.route(x.reshape(-1, 16))[1].reshape(-1), minlength=6)
    assert counts[5] == 0 and counts.max() > 2 * counts[:5].min()  # uneven, one expert idle
    grads = []
    for run in (lambda xx: moe_loop_reference(moe, xx), lambda xx: moe(xx, impl=impl)):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        y = run(xx)
        (y * torch.linspace(-1, 1, 16)).sum().backward()  # a non-uniform upstream gradient
        grads.append([y.detach(), xx.grad] + [p.grad.clone() for p in moe.parameters()])
    for ref, got in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    assert torch.equal(grads[1][3][5], torch.zeros(8, 16))  # the idle expert's gate_proj: zero gradient


@pytest.mark.parametrize("impl", MOE_IMPLS)
def test_moe_without_tokens_gives_zero_gradients(impl):
    moe, _ = uneven_moe()  # FSDP's uniform mode runs a bank on no token: every parameter needs a gradient
    moe(torch.zeros(0, 16), impl=impl).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in moe.parameters())


def test_moe_has_no_host_sync():
    """The meta device has no data, so a forward that runs there reads no value on the host:
    no .item(), .tolist() or data-dependent shape. The loop version cannot run there."""
    with torch.device("meta"):
        moe, x = MoEFFN(16, 8, n_routed=6, top_k=2), torch.randn(3, 7, 16)
        assert moe(x, impl="padded").shape == x.shape
        bf16 = MoEFFN(16, 8, n_routed=6, top_k=2).bfloat16()  # _grouped_mm's meta kernel is bf16-only
        assert bf16(x.bfloat16(), impl="grouped").shape == x.shape
        with pytest.raises(NotImplementedError):
            moe_loop_reference(moe, x)
    answers = []  # whether the build has a CPU _grouped_mm does not depend on the first caller's context
    for context in (torch.no_grad, torch.enable_grad):
        _grouped_mm_runs_on_cpu.cache_clear()
        with context():
            answers.append(_grouped_mm_runs_on_cpu(torch.float32))
    assert answers[0] == answers[1]
    assert grouped_mm_ok(torch.zeros(1, dtype=torch.float32), 16, 8) == answers[0]
    assert not grouped_mm_ok(torch.zeros(1, dtype=torch.float64), 16, 8)  # fp64: the padded path
    assert not grouped_mm_ok(torch.zeros(1, dtype=torch.float32), 16, 6)  # 24-byte rows: the padded path


def test_moe_under_activation_checkpointing():
    """The first forward also asks whether the build has a CPU _grouped_mm (then cached): that must
    save no tensor which the recomputation, asking no more, would not save."""
    moe, x = uneven_moe()
    _grouped_mm_runs_on_cpu.cache_clear()
    x.requires_grad_()
    y = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    assert torch.allclose(y, moe_loop_reference(moe, x), atol=1e-5) and torch.isfinite(x.grad).all()

def test_moe_under_bf16_autocast_matches_loop():
    moe, x = uneven_moe()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = moe_loop_reference(moe, x), moe(x)
    assert got.dtype == ref.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-2), (got - ref).abs().max()


def test_return_layer_and_bf16_autocast():
    model = tiny_backbone()
    ids = torch.randint(0, 64, (2, 6))
    h, pos = model.embed_tokens(ids), torch.arange(6).expand(2, 6)
    final, mid = model(h, torch.zeros_like(ids), causal_mask(2, 6), pos, return_layer=0)
    ref_mid = model.layers[0](h, torch.zeros_like(ids), *rope_cos_sin(pos, 16, 10000.0), causal_mask(2, 6))
    assert torch.allclose(mid, ref_mid) and final.shape == (2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(h, torch.randint(0, 3, (2, 6)), causal_mask(2, 6), pos)
    assert torch.isfinite(out).all()


def test_kv_cache_step_by_step_equals_full_forward():
    model = tiny_backbone()
    B, L, P = 2, 12, 5
    h, ids = torch.randn(B, L, 32), torch.randint(0, 3, (B, L))
    pos, kind = torch.arange(L).expand(B, L), torch.ones(B, L, dtype=torch.long)
    full = model(h, ids, causal_mask(B, L), pos)

    cache = KVCache(2, B, 2, 16, max_len=L)
    # prefill P tokens, then one token at a time; each new query sees every cached key
    out = [model(h[:, :P], ids[:, :P], causal_mask(B, P), pos[:, :P], kv_cache=cache)]
    cache.commit(kind[:, :P], pos[:, :P])
    for i in range(P, L):
        mask = torch.ones(B, 1, 1, i + 1, dtype=torch.bool)
        out.append(model(h[:, i:i + 1], ids[:, i:i + 1], mask, pos[:, i:i + 1], kv_cache=cache))
        cache.commit(kind[:, i:i + 1], pos[:, i:i + 1])
    assert cache.length == L
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-5)


def test_kv_cache_frozen_prefix_block():
    """A block of queries run against the cached prefix without commit, twice, sees the same prefix."""
    model = tiny_backbone()
    B, P, N = 2, 6, 4
    L = P + N
    h, ids, pos = torch.randn(B, L, 32), torch.randint(0, 3, (B, L)), torch.arange(L).expand(B, L)
    mask = causal_mask(B, L).clone()
    mask[:, :, P:, P:] = True  # the block is bidirectional inside, causal to the prefix
    full = model(h, ids, mask, pos)

    cache = KVCache(2, B, 2, 16, max_len=L)
    model(h[:, :P], ids[:, :P], causal_mask(B, P), pos[:, :P], kv_cache=cache)
    cache.commit(torch.ones(B, P, dtype=torch.long), pos[:, :P])
    block_mask = torch.ones(B, 1, N, L, dtype=torch.bool)
    other = model(torch.randn(B, N, 32), ids[:, P:], block_mask, pos[:, P:], kv_cache=cache)  # e.g. another ODE step
    again = model(h[:, P:], ids[:, P:], block_mask, pos[:, P:], kv_cache=cache)
    assert cache.length == P
    assert not torch.allclose(other, again)
    assert torch.allclose(again, full[:, P:], atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randn(B, L, 32), ids, torch.ones(B, 1, L, P + L, dtype=torch.bool), pos, kv_cache=cache)


def test_init_weights_scales():
    model = tiny_backbone()
    model.init_weights()
    assert torch.equal(model.norm.weight, torch.ones(32))
    std_q = model.layers[0].self_attn.q_proj.weight.std()
    std_o = model.layers[0].self_attn.o_proj.weight.std()
    assert 0.015 < std_q < 0.025 and std_o < std_q  # residual writers scaled down
