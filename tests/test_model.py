"""The RF model: attention mask on a built batch, cached inference pieces, stage init, a smoke run
per variant.  Run: pytest tests/test_model.py"""

import pytest
import torch
from conftest import V, tiny_model

from repforce import pretrained
from repforce.config import VARIANTS, ModelConfig
from repforce.model import RFModel, attention_mask
from repforce.sequence import ENC, GEN, PAD, REP, TEXT

BOS, BOI, EOI, IMG_START, IMG_END, EOS = 1, 2, 3, 4, 5, 6  # special ids of the test vocabulary
tiny = tiny_model


def make_batch(cfg: ModelConfig, layout=("gen", "und", "gen", "und"), seed=0, drop_rep=None, prompt_lens=None):
    """A batch to the contract of sequence.py: right-padded rows of generation / understanding samples."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(7, V, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for i, what in enumerate(layout):
        if what == "gen":
            n_prompt = prompt_lens[i] if prompt_lens else 2 + i
            toks = [BOS, *rnd(n_prompt), BOI]
            kinds = [TEXT] * len(toks)
            m = cfg.n_rep if cfg.rep_slots else 0
            toks += [0] * (m + cfg.n_gen) + [EOI]
            kinds += [REP] * m + [GEN] * cfg.n_gen + [TEXT]
            targets = [-100] * len(toks)
        else:
            question, answer = rnd(2), rnd(1 + i % 2)
            toks = [BOS, IMG_START] + [0] * cfg.n_enc + [IMG_END] + question + answer + [EOS]
            kinds = [TEXT, TEXT] + [ENC] * cfg.n_enc + [TEXT] * (2 + len(question) + len(answer))
            targets = [-100] * len(toks)
            first = len(toks) - len(answer) - 2  # the last question token predicts the first answer token
            for j in range(first, len(toks) - 1):
                targets[j] = toks[j + 1]
        rows.append((toks, kinds, targets))
    L = max(len(r[0]) for r in rows) + 2  # at least two pads everywhere
    pad = lambda xs, v: xs + [v] * (L - len(xs))  # noqa: E731
    B = len(layout)
    images = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    is_gen = torch.tensor([w == "gen" for w in layout])
    gen_x = images if cfg.variant.startswith("pixel") else torch.randn(
        B, cfg.gen_channels, cfg.gen_size, cfg.gen_size, generator=g)
    return {
        "tokens": torch.tensor([pad(r[0], 0) for r in rows]),
        "kind": torch.tensor([pad(r[1], PAD) for r in rows]),
        "text_targets": torch.tensor([pad(r[2], -100) for r in rows]),
        "images": images,
        "gen_x": gen_x,
        "is_gen": is_gen,
        "drop_rep": torch.zeros(B, dtype=torch.bool) if drop_rep is None else torch.tensor(drop_rep),
    }


def build(variant="pixel_rf", seed=0, **kw):
    torch.manual_seed(seed)
    return RFModel(tiny(variant, **kw))


# ---------------------------------------------------------------- config


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="model.variant"):
        tiny("pixel_rfx")
    with pytest.raises(ValueError, match="model.image_size"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="model.gen_size"):
        tiny("pixel", gen_size=8)
    with pytest.raises(ValueError, match="model.encoder_ema"):
        tiny(encoder_ema=1.5)
    cfg = ModelConfig()  # the shapes-sized defaults
    assert (cfg.n_enc, cfg.n_rep, cfg.n_gen) == (64, 16, 64)


@pytest.mark.parametrize("decay", [0.9, 1.0])
def test_target_encoder_follows_the_encoder_unless_frozen(decay):
    model = build(encoder_ema=decay)
    before = [p.clone() for p in model.ema_encoder.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_ema_encoder()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.ema_encoder.parameters())]
    assert all(moved) if decay < 1 else not any(moved)  # 1.0: stationary targets (the shapes preset)


# ---------------------------------------------------------------- attention mask


def test_mask_of_a_built_batch_forbids_exactly_what_it_must():
    cfg = tiny()
    batch = make_batch(cfg)
    kind = batch["kind"]
    B, L = kind.shape
    pos = torch.arange(L).expand(B, L)
    mask = attention_mask(kind, pos)[:, 0]  # (B, L, L)
    for b in range(B):
        k = kind[b].tolist()
        valid = [j for j in range(L) if k[j] != PAD]
        block = {what: [j for j in range(L) if k[j] == what] for what in (ENC, GEN)}
        for i in range(L):
            seen = set(mask[b, i].nonzero().flatten().tolist())
            if k[i] in (TEXT, REP):  # causal: itself and everything valid before
                expected = {j for j in valid if j <= i}
            elif k[i] in (ENC, GEN):  # its whole block plus the causal prefix before the block
                expected = set(block[k[i]]) | {j for j in valid if j < block[k[i]][0]}
            else:  # padding: sees something (keeps SDPA finite), nobody sees it
                assert seen
                continue
            assert seen == expected, (b, i, k[i])
    # a pixel row never sees EOI; the encoder block never sees IMG_END after it
    gen_row = batch["is_gen"].nonzero()[0, 0]
    eoi = (batch["tokens"][gen_row] == EOI).nonzero()[0, 0]
    assert not mask[gen_row, (kind[gen_row] == GEN).nonzero()[:, 0], eoi].any()


def test_samples_and_padding_are_invisible_to_each_other():
    model = build().eval()
    batch = make_batch(model.cfg, layout=("und", "gen", "und"))
    kind = batch["kind"]

    def hidden(b):
        torch.manual_seed(0)
        h, aux = model.build_inputs(b)
        return model.forward_hidden(h, kind, aux["positions"])

    base = hidden(batch)
    other = dict(batch, images=batch["images"].clone(), tokens=batch["tokens"].clone())
    other["images"][2] = -other["images"][2]  # understanding sample 2: new image and question
    other["tokens"][2, -6:] = torch.where(kind[2, -6:] == TEXT, 9, other["tokens"][2, -6:])
    other["tokens"][kind == PAD] = 17  # junk in every pad slot
    changed = hidden(other)
    valid = kind != PAD
    assert not torch.allclose(changed[2], base[2])
    for b in (0, 1):
        assert torch.allclose(changed[b][valid[b]], base[b][valid[b]], atol=1e-6)


# ---------------------------------------------------------------- inference pieces


@pytest.mark.parametrize("variant", ["pixel_rf", "pixel"])
def test_cached_prefix_then_pixel_block_equals_full_forward(variant):
    """Prefill text + rep, run the pixel block against the frozen cache (twice), compare with one full pass;
    rep logits sampled step by step from the cache equal the full pass too."""
    model = build(variant).eval()
    batch = make_batch(model.cfg, layout=("gen", "gen"), prompt_lens=[3, 3])
    kind = batch["kind"]
    torch.manual_seed(0)
    h, aux = model.build_inputs(batch)
    pos = aux["positions"]
    full = model.forward_hidden(h, kind, pos)
    gen_at = (kind[0] == GEN).nonzero()[:, 0]
    P, N = int(gen_at[0]), len(gen_at)
    L = kind.shape[1]

    cache = model.new_kv_cache(2, L)
    boi = 5  # BOS + 3 prompt tokens, BOI at index 4: prefill through BOI, then each rep token alone
    out = [model.forward_hidden(h[:, :boi], kind[:, :boi], pos[:, :boi], kv_cache=cache)]
    for i in range(boi, P):
        out.append(model.forward_hidden(h[:, i:i + 1], kind[:, i:i + 1], pos[:, i:i + 1], kv_cache=cache))
    prefix = torch.cat(out, 1)
    assert torch.allclose(prefix, full[:, :P], atol=1e-5)
    if variant == "pixel_rf":
        rep = slice(boi - 1, P - 1)  # BOI .. r_{M-1} predict r_1 .. r_M
        assert torch.allclose(model.rep_logits(prefix[:, rep]), model.rep_logits(full[:, rep]), atol=1e-5)

    blk = slice(P, P + N)
    z2 = torch.randn(2, 3, 16, 16)
    h2 = model.embed_gen(z2, torch.full((2,), 0.3))  # another ODE step's input
    model.forward_hidden(h2, kind[:, blk], pos[:, blk], kv_cache=cache, commit=False)
    again = model.forward_hidden(h[:, blk], kind[:, blk], pos[:, blk], kv_cache=cache, commit=False)
    assert cache.length == P
    assert torch.allclose(model.gen_pred(again), model.gen_pred(full[:, blk]), atol=1e-5)


def test_embed_rep_drop_and_cells():
    model = build()
    ids = torch.randint(0, 16, (2, 4))
    drop = torch.tensor([False, True])
    x = model.embed_rep(ids, drop=drop)
    assert torch.allclose(x[1], model.null_rep + model.rep_pos)  # M copies of one null embedding, positions kept
    assert torch.allclose(model.embed_rep(ids[:, 2:3], start=2), model.embed_rep(ids)[:, 2:3])  # one step of decoding


# ---------------------------------------------------------------- stages and gradients


def test_init_from_vlm_copies_the_understanding_expert():
    vlm = build("vlm", seed=1)
    model = build("pixel_rf", seed=2)
    report = pretrained.init_from_vlm(model, {"_orig_mod." + k: v for k, v in vlm.state_dict().items()})
    sd, vsd = model.state_dict(), vlm.state_dict()
    for e in range(3):
        assert torch.equal(sd[f"backbone.layers.1.mlp.experts.{e}.down_proj.weight"],
                           vsd["backbone.layers.1.mlp.experts.0.down_proj.weight"])
    for name in ("encoder.blocks.0.qkv.weight", "connector.fc1.weight", "backbone.embed_tokens.weight",
                 "lm_head.weight"):
        assert torch.equal(sd[name], vsd[name]) and name in report["loaded"]
    assert torch.equal(sd["ema_encoder.blocks.0.qkv.weight"], vsd["encoder.blocks.0.qkv.weight"])
    assert {"gen_embed.weight", "rep_embed.weight", "quantizer.prototypes"} <= set(report["fresh"])
    assert "backbone.layers.0.mlp.experts.2.up_proj.weight" in report["copied"]


@pytest.mark.parametrize("variant", ["pixel_rf", "pixel_cont", "pixel_repa"])
def test_encoder_is_trained_by_understanding_only(variant):
    model = build(variant).train()
    model(make_batch(model.cfg, layout=("gen", "gen")))["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.ema_encoder.parameters())
    model.zero_grad()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # zero at init: no gradient would reach the encoder
    model(make_batch(model.cfg, layout=("gen", "und")))["loss"].backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_drop_rep_removes_the_rep_loss_of_that_sample():
    model = build().eval()
    batch = make_batch(model.cfg, layout=("gen", "gen"), drop_rep=[True, True])
    out = model(batch)
    assert out["loss_rep"] == 0 and out["loss_fm"] > 0


# ---------------------------------------------------------------- smoke: every loss term falls


def losses(model, batch):
    model.eval()
    torch.manual_seed(123)  # same noise, times and dropout for the before / after comparison
    with torch.no_grad():
        out = model(batch)
    model.train()
    return {k: v.item() for k, v in out.items() if k.startswith("loss")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_every_loss_term_falls(variant):
    model = build(variant, rep_momentum=0.9)
    layout = ("und", "und") if variant == "vlm" else ("gen", "und", "gen", "und")
    batch = make_batch(model.cfg, layout=layout, drop_rep=[False, False, True, False][:len(layout)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    before = losses(model, batch)
    for _ in range(40):  # fp32: under bf16 autocast the result depends on whether the CPU has native bf16
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_ema_encoder()
    after = losses(model, batch)
    assert set(before) == {"loss", "loss_lm"} | {
        "pixel": {"loss_fm"}, "vae": {"loss_fm"}, "vlm": set(), "pixel_rf": {"loss_rep", "loss_fm"},
        "vae_rf": {"loss_rep", "loss_fm"}, "pixel_repa": {"loss_fm", "loss_repa"},
        "pixel_cont": {"loss_cont", "loss_fm"}}[variant]
    for k in before:
        assert after[k] < before[k], (k, before[k], after[k])


def test_sincos_positions_put_each_rep_cell_on_the_patches_it_covers():
    from repforce.positions import grid_sincos

    gen, rep = grid_sincos(64, 8, 8), grid_sincos(64, 8, 4)  # an 8 x 8 patch grid under a 4 x 4 cell grid
    assert torch.isclose(gen.pow(2).mean().sqrt(), torch.tensor(0.1))
    sim = (rep @ gen.T).reshape(16, 8, 8)
    for cell in range(16):
        i, j = divmod(cell, 4)
        near = sim[cell, 2 * i:2 * i + 2, 2 * j:2 * j + 2]  # the four patches under the cell
        far = sim[cell].clone()
        far[2 * i:2 * i + 2, 2 * j:2 * j + 2] = -1e9
        assert near.min() > far.max()
    m = RFModel(tiny("pixel_rf", pos_init="sincos"))
    side = m.cfg.gen_size // m.cfg.gen_patch
    assert torch.equal(m.gen_pos.data, grid_sincos(m.cfg.dim, side, side))
    assert not torch.equal(RFModel(tiny("pixel_rf")).gen_pos.data, m.gen_pos.data)  # "normal" stays the default


def test_2d_understanding_rope_puts_encoder_tokens_on_their_grid_and_is_off_by_default():
    """model.und_rope="2d": an understanding image's encoder tokens at (t, t + row, t + column), t its first
    position, whatever left padding shifts it by; the text around it stays 1D; "1d" (the default) leaves them 1D."""
    from repforce.positions import image_rope_positions

    cfg = tiny_model("vlm", image_rope="2d", und_rope="2d")  # 16 x 16 image, 4-px patches: a 4 x 4 grid
    E = cfg.n_enc
    row = [TEXT, TEXT] + [ENC] * E + [TEXT] * 4
    kind = torch.tensor([row, [PAD] * 3 + row[:-3]])  # the second row left-padded by 3
    pos = torch.arange(kind.shape[1])[None].expand(2, -1)
    rp = image_rope_positions(kind, pos, cfg)
    for b, start in ((0, 2.0), (1, 5.0)):
        enc = rp[b][kind[b] == ENC]
        assert (enc[:, 0] == start).all()
        grid = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float)
        assert torch.equal(enc[:, 1:] - start, grid)
        text = pos[b][kind[b] != ENC].float()
        assert torch.equal(rp[b][kind[b] != ENC], text[:, None].expand(-1, 3))
    one_d = image_rope_positions(kind, pos, tiny_model("vlm", image_rope="2d"))
    assert torch.equal(one_d, pos.float()[..., None].expand(-1, -1, 3))
    with pytest.raises(ValueError, match="model.und_rope='2d': 2d needs model.image_rope=2d"):
        tiny_model("vlm", und_rope="2d")


def test_understanding_position_table_is_added_to_the_encoder_tokens_and_off_by_default():
    """model.und_pos="sincos": a learned table, one row per encoder patch, starting as a 2D sin-cos of RMS 1, added
    to the connector's output (a smaller image takes its grid's top-left); "none" (the default) adds nothing, and a
    vlm checkpoint without the table starts a model with one (init_from_vlm: the table is fresh)."""
    from repforce.pretrained import init_from_vlm

    torch.manual_seed(0)
    plain = RFModel(tiny_model("vlm"))
    assert not hasattr(plain, "und_pos")
    with_pos = RFModel(tiny_model("vlm", und_pos="sincos"))  # 16 x 16 image, 4-px patches: a 4 x 4 grid
    report = init_from_vlm(with_pos, plain.state_dict())
    assert report["fresh"] == ["und_pos"]
    table = with_pos.und_pos.detach()
    assert table.shape == (16, with_pos.cfg.dim) and abs(table.pow(2).mean().sqrt().item() - 1.0) < 1e-4
    assert len({tuple(r.tolist()) for r in table}) == 16  # every patch its own position
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(with_pos.embed_image(x) - plain.embed_image(x), table.expand(2, -1, -1), atol=1e-5)
        small = with_pos.embed_image(x[..., :8, :8]) - plain.embed_image(x[..., :8, :8])  # a 2 x 2 grid
    assert torch.allclose(small[0], table.view(4, 4, -1)[:2, :2].reshape(4, -1), atol=1e-5)
    with pytest.raises(ValueError, match="model.und_pos='learned': must be none or sincos"):
        tiny_model("vlm", und_pos="learned")


def test_2d_image_rope_puts_each_patch_beside_its_rep_cell_and_leaves_text_1d():
    from repforce.backbone import rope_cos_sin
    from repforce.positions import image_rope_positions

    cfg = tiny("pixel_rf", image_rope="2d")  # 16 x 16 image, 4-px patches: 4 x 4 patches under 2 x 2 cells
    M, N = cfg.n_rep, cfg.n_gen
    kind = torch.tensor([[TEXT] * 3 + [REP] * M + [GEN] * N + [TEXT, PAD]])
    pos = torch.arange(kind.shape[1])[None]
    rp = image_rope_positions(kind, pos, cfg)
    text = (kind == TEXT) | (kind == PAD)
    assert torch.equal(rp[text], pos[text].float()[:, None].expand(-1, 3))  # text: (p, p, p)
    start = 3.0
    assert (rp[0, 3:3 + M + N, 0] == start).all()  # one t for the whole image
    rep_hw, gen_hw = rp[0, 3:3 + M, 1:] - start, rp[0, 3 + M:3 + M + N, 1:] - start
    assert torch.equal(gen_hw, torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float))
    for j in range(N):  # the patch's own cell is the nearest rep slot, at offset 0.5 in h and w
        r, c = divmod(j, 4)
        own = (r // 2) * 2 + c // 2
        d = (rep_hw - gen_hw[j]).abs().max(dim=1).values
        assert d.argmin() == own and d[own] == 0.5
    # a chunk that starts inside the image (a cached rep step) names the image's start
    assert torch.equal(image_rope_positions(kind[:, 5:6], pos[:, 5:6], cfg, torch.tensor([3])), rp[:, 5:6])
    # equal components are 1D RoPE exactly: text keeps what a 1D model computes
    cos3, sin3 = rope_cos_sin(pos[..., None].expand(-1, -1, 3), 16, 1e4)
    cos1, sin1 = rope_cos_sin(pos, 16, 1e4)
    assert torch.equal(cos3, cos1) and torch.equal(sin3, sin1)
