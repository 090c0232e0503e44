"""The backbone: a Qwen3 decoder block whose FFN is a Mixture-of-Transformers.

Reads primitives -> block -> backbone. The block is Qwen3's (RMSNorm, grouped-query
attention with RMSNorm on q and k over head_dim before RoPE, SwiGLU) with parameter
names as in Hugging Face `Qwen3Model`, so pretrained weights load by renaming
`model.` -> `backbone.` and copying each `mlp.*` into every `mlp.experts.{e}.*`.

Mixture-of-Transformers (BAGEL): attention is shared by all tokens; the FFN is one of
E experts chosen per token by an expert id (0 understanding: text and image-encoder
tokens, 1 representation, 2 generation). Norms are NOT routed: one RMSNorm per place,
as in Qwen3. It keeps the pretrained names 1:1 and the modality split lives where the
parameters are (the FFN holds 2/3 of them); routing the norms would be a second
`RoutedFFN`-style module around RMSNorm if ever wanted.

Expert id -1 marks a token that skips the FFN (padding: its output is never used).

A Qwen3-MoE backbone makes each MoT expert a `MoEFFN` (router + bank of routed SwiGLU
experts), so a layer holds three banks, each starting as a copy of the LLM's one.

Axes: B batch, L query length, S key length (cache prefix + L), D model width,
H query heads, Hk key/value heads, Dh head dim, F FFN hidden, E experts, N = B * L,
R routed experts of a MoE bank, k experts per token.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import flex_attend

# ---------------------------------------------------------------- primitives


class RMSNorm(nn.Module):
    """Qwen3RMSNorm: x / rms(x) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, L, Dh) for integer positions (B, L), Hugging Face layout, or for
    multimodal positions (B, L, 3) (model.image_rope_positions), the three components interleaved
    over the frequency pairs as Qwen3-VL's interleaved MRoPE, so each gets high and low frequencies.

    HF rotates the two halves of the head dim (rotate_half), so frequencies repeat:
    cos = [cos(p f_0..f_{Dh/2-1}), cos(p f_0..f_{Dh/2-1})].
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    if positions.dim() == 3:  # (B, L, 3) multimodal positions (t, h, w), interleaved: pair k rotates by component k % 3
        comp = torch.arange(head_dim // 2, device=positions.device) % 3
        angles = positions.float()[..., comp] * inv_freq  # (B, L, Dh/2); equal components = 1D RoPE exactly
    else:
        angles = positions.float()[..., None] * inv_freq  # (B, L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, Dh) rotated by position, in fp32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (x.float() * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of a prefix, per layer, plus the kind and position of each cached slot.

    One forward writes its new keys/values at [length, length + L) in every layer and
    attends to [0, length + L). They join the prefix only on `commit`:

        prefill:   forward(prompt, kv_cache=c);  c.commit(kind, pos)
        one step:  forward(token,  kv_cache=c);  c.commit(kind, pos)
        frozen:    forward(pixel block, kv_cache=c)   # no commit: the next call
                   overwrites the same slots, the prefix stays as it was

    The frozen form is the pixel stage of sampling: every ODE step runs the N pixel
    tokens against the cached text + rep prefix, at the cost of N tokens. Storage is
    allocated on first write, in the dtype of the keys (bf16 under autocast).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int, device=None):
        self.n_layers, self.batch, self.max_len = n_layers, batch, max_len
        self.shape = (batch, n_kv_heads, max_len, head_dim)
        self.device = device
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.kind = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, S_max)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, S_max)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hk, L, Dh) after the prefix; return prefix + new, (B, Hk, length + L, Dh)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} slots > max_len {self.max_len}")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keys_meta(self, kind: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kind and position of every key a forward of (kind, pos) (B, L) attends to: (B, length + L)."""
        return (torch.cat([self.kind[:, :self.length], kind], dim=1),
                torch.cat([self.pos[:, :self.length], pos], dim=1))

    def commit(self, kind: torch.Tensor, pos: torch.Tensor) -> None:
        """Make the last forward's L slots part of the prefix."""
        end = self.length + kind.shape[1]
        self.kind[:, self.length:end] = kind
        self.pos[:, self.length:end] = pos
        self.length = end

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Qwen3 attention: GQA, RMSNorm on q and k per head before RoPE, no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx  # which KVCache slot this layer owns
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None = None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_norm(self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hk, L, Dh)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, L, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hk, S, Dh)
        # boolean mask (B, 1, L, S), True = may attend; enable_gqa shares each kv head across H/Hk query heads
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(attn_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        else:  # a FlexAttention BlockMask of the same rule (attention.py): no L x L mask
            y = flex_attend(q, k, v, attn_mask, gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class SwiGLU(nn.Module):
    """Qwen3MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing:
    """Where each expert's tokens are in a flattened (N,) batch; computed once per forward, shared by all layers.

    An expert id of -1 (padding) means no FFN at all: that token's FFN output is zero.
    """

    def __init__(self, expert_ids: torch.Tensor, n_experts: int):
        ids = expert_ids.reshape(-1)  # (N,)
        ids = torch.where(ids < 0, n_experts, ids)  # skipped tokens sort last
        counts = torch.bincount(ids, minlength=n_experts + 1).tolist()  # tokens per expert (one host sync)
        self.counts = counts[:n_experts]
        self.single = next((e for e, c in enumerate(self.counts) if c == ids.numel()), None)  # all in one expert?
        if self.single is None:
            self.order = torch.argsort(ids, stable=True)[:sum(self.counts)]  # (N_kept,) tokens grouped by expert


@functools.cache
def _grouped_mm_runs_on_cpu(dtype: torch.dtype) -> bool:
    """Does this torch build have a CPU `_grouped_mm` for dtype, in the forms forward and backward use?
    (2.6/2.7 have none.) Runs under no_grad, so that inside activation checkpointing it saves no
    tensor on the first forward that the recomputation (cached answer) would not save."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:  # on the CPU, whatever device context the first forward runs in
        with torch.no_grad():
            a = torch.zeros(3, 8, dtype=dtype, device="cpu")
            b = torch.zeros(2, 8, 8, dtype=dtype, device="cpu")
            offs = torch.tensor([1, 3], dtype=torch.int32, device="cpu")
            torch._grouped_mm(a, b, offs=offs)  # (N k, in) by per-group (in, out): forward, input gradient
            torch._grouped_mm(a.t(), a, offs=offs)  # (in, N k) by (N k, out) per group: weight gradient
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_ok(x: torch.Tensor, dim: int, hidden: int) -> bool:
    """Whether `torch._grouped_mm` runs the experts of a (dim, hidden) bank on x without a host sync.

    CUDA: only its CUTLASS kernel (bf16 on sm90/sm100); elsewhere it falls back to a loop
    over `offs.cpu()`, one sync per call. CPU: a loop in C++ over offsets already on the
    host (fp32/bf16/fp16 where the build has it). Both want rows of 16 bytes, so dim and
    hidden must be multiples of 16 / itemsize (every Qwen3-MoE size is).
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if (dim * x.element_size()) % 16 or (hidden * x.element_size()) % 16:
        return False
    if x.device.type == "cuda":
        return (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x.device)[0] in (9, 10))
    return x.device.type == "cpu" and _grouped_mm_runs_on_cpu(x.dtype)


class MoEFFN(nn.Module):
    """Qwen3-MoE sparse FFN: a softmax router picks k of R routed SwiGLU experts per token.

    Hugging Face semantics: p = softmax(gate(x)) in fp32, keep the top k, renormalize
    them when `norm_topk`, y = sum_j p_j * expert_j(x). Weights are stacked per routed
    expert, (R, F, D) and (R, D, F), so FSDP shards a bank along its expert axis and the
    checkpoint's `experts.{j}.gate_proj.weight` is row j of `gate_proj`.

    The N k (token, expert) pairs are sorted by expert and all R experts run as one
    computation, with no host sync (the group sizes stay on the device):
      - "grouped": `torch._grouped_mm` over the sorted pairs, group ends as offsets; the
        cost of the k experts each token uses. Where `grouped_mm_ok` says it runs.
      - "padded": each expert's pairs copied into its row of an (R, N, D) buffer, one bmm
        per projection. N rows per expert is the only bound known without a sync (an
        expert gets each token at most once), so it costs R/k times the grouped FLOPs: the
        exact fallback for fp64, odd widths and GPUs without the bf16 kernel.
    `moe_loop_reference` is the former per-expert loop, kept for tests and the benchmark.
    """

    def __init__(self, dim: int, hidden: int, n_routed: int, top_k: int, norm_topk: bool = True):
        super().__init__()
        self.top_k, self.norm_topk = top_k, norm_topk
        self.gate = nn.Linear(dim, n_routed, bias=False)  # the router
        self.gate_proj = nn.Parameter(torch.empty(n_routed, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_routed, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_routed, dim, hidden))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> routing weights (N, k) in x's dtype and expert ids (N, k)."""
        p = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, R)
        w, idx = p.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        """x (..., D) -> (..., D). impl "grouped" or "padded" forces a path (tests, benchmark)."""
        shape, D = x.shape, x.shape[-1]
        x = x.reshape(-1, D)  # (N, D)
        w, idx = self.route(x)
        R, hidden = self.gate_proj.shape[:2]
        order = torch.argsort(idx.reshape(-1), stable=True)  # (N k,) pairs grouped by expert
        token = order // self.top_k  # (N k,) the token of each sorted pair
        e_sorted = idx.reshape(-1)[order]  # (N k,) ascending expert ids
        ends = torch.searchsorted(e_sorted, torch.arange(1, R + 1, device=x.device), out_int32=True)  # (R,)
        # autocast does not cover _grouped_mm: cast as it would a matmul (a no-op outside autocast)
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        xs = x.index_select(0, token).to(dt)  # (N k, D)
        gate, up, down = (W.to(dt) for W in (self.gate_proj, self.up_proj, self.down_proj))
        impl = impl or ("grouped" if grouped_mm_ok(xs, D, hidden) else "padded")
        if impl == "grouped":
            def mm(a, weight):  # a (N k, in) @ weight[e].T for each pair's expert e -> (N k, out)
                return torch._grouped_mm(a, weight.transpose(1, 2), offs=ends)
            y = mm(F.silu(mm(xs, gate)) * mm(xs, up), down)  # (N k, D)
        else:
            starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()  # (R,)
            slot = e_sorted * x.shape[0] + torch.arange(len(order), device=x.device) - starts[e_sorted]  # (N k,)
            xp = xs.new_zeros(R * x.shape[0], D).index_copy(0, slot, xs).view(R, x.shape[0], D)  # (R, N, D)
            h = F.silu(torch.bmm(xp, gate.transpose(1, 2))) * torch.bmm(xp, up.transpose(1, 2))  # (R, N, F)
            y = torch.bmm(h, down.transpose(1, 2)).view(-1, D).index_select(0, slot)  # (N k, D)
        y = y * w.reshape(-1)[order, None]  # (N k, D) weighted
        return x.new_zeros(x.shape).index_add_(0, token, y.to(x.dtype)).view(shape)


def moe_loop_reference(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The per-expert Python loop MoEFFN.forward replaced (one host sync, R small matmuls):
    the reference the grouped and padded paths are tested and benchmarked against."""
    shape, D = x.shape, x.shape[-1]
    x = x.reshape(-1, D)  # (N, D)
    w, idx = moe.route(x)
    order = torch.argsort(idx.reshape(-1), stable=True)  # (N k,)
    counts = torch.bincount(idx.reshape(-1), minlength=moe.gate_proj.shape[0]).tolist()  # the host sync
    token = order // moe.top_k  # (N k,)
    ys = []
    for e, xe in enumerate(x.index_select(0, token).split(counts)):  # per-expert (n_e, D)
        if xe.shape[0]:
            h = F.silu(xe @ moe.gate_proj[e].T) * (xe @ moe.up_proj[e].T)  # (n_e, F)
            ys.append(h @ moe.down_proj[e].T)
    if not ys:  # no token at all (FSDP's uniform mode): zero gradients instead of none
        touch = moe.gate_proj[:0].sum() + moe.up_proj[:0].sum() + moe.down_proj[:0].sum()
        ys = [x.new_zeros(0, D) + touch.to(x.dtype)]
    y = torch.cat(ys) * w.reshape(-1)[order, None]  # (N k, D) weighted
    return x.new_zeros(x.shape).index_add_(0, token, y.to(x.dtype)).view(shape)


class RoutedFFN(nn.Module):
    """Mixture-of-Transformers FFN: `experts[e]` runs on exactly the tokens whose id is e.

    Tokens are gathered per expert (one index_select), each expert runs on its
    contiguous slice, and one index_copy puts them back, so the cost is that of a
    single dense FFN over the non-padding tokens. An expert with no tokens is skipped
    and gets no gradient, unless `uniform` is set: then every expert runs, on an empty
    slice if need be, so every parameter gets a (zero) gradient on every rank, which
    FSDP's reduce-scatter needs (RFModel.set_uniform sets it).

    Each expert is a dense SwiGLU, or with moe=(R, k, norm_topk) a `MoEFFN` bank.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, moe: tuple[int, int, bool] | None = None):
        super().__init__()
        self.uniform = False
        make = (lambda: MoEFFN(dim, hidden, *moe)) if moe else (lambda: SwiGLU(dim, hidden))
        self.experts = nn.ModuleList(make() for _ in range(n_experts))

    def forward(self, x: torch.Tensor, routing: Routing | torch.Tensor) -> torch.Tensor:
        if isinstance(routing, torch.Tensor):
            routing = Routing(routing, len(self.experts))
        if routing.single is not None and not self.uniform:
            return self.experts[routing.single](x)
        B, L, D = x.shape
        if routing.single is not None:  # uniform mode: the others run on empty slices
            order, counts = torch.arange(B * L, device=x.device), [B * L if e == routing.single else 0
                                                                  for e in range(len(self.experts))]
        else:
            order, counts = routing.order, routing.counts
        xs = x.reshape(B * L, D).index_select(0, order).split(counts)  # per-expert (N_e, D)
        ys = [expert(xe) for expert, xe in zip(self.experts, xs) if xe.shape[0] > 0 or self.uniform]
        ys = torch.cat(ys) if ys else x.new_zeros(0, D)  # (N_kept, D), grouped by expert
        return ys.new_zeros(B * L, D).index_copy(0, order, ys).view(B, L, D)


# ---------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm Qwen3 decoder layer with a routed FFN."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, ffn_hidden, n_experts, eps, layer_idx, moe=None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, eps, layer_idx)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = RoutedFFN(dim, ffn_hidden, n_experts, moe)

    def forward(self, h, routing, cos, sin, attn_mask, kv_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h), routing)


# ---------------------------------------------------------------- backbone


class Transformer(nn.Module):
    """Qwen3Model with MoT FFNs. Takes input embeddings, so callers mix token, image and rep inputs.

    moe_experts > 0 makes it Qwen3-MoE: every FFN expert is a bank of moe_experts routed
    experts of width ffn_hidden, moe_top_k per token (Qwen3-MoE's moe_intermediate_size,
    num_experts, num_experts_per_tok, norm_topk_prob)."""

    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 ffn_hidden: int, n_experts: int = 3, eps: float = 1e-6, rope_theta: float = 10000.0,
                 moe_experts: int = 0, moe_top_k: int = 0, moe_norm_topk: bool = True):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_layers, self.n_experts = n_layers, n_experts
        self.n_kv_heads, self.head_dim, self.rope_theta = n_kv_heads, head_dim, rope_theta
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        moe = (moe_experts, moe_top_k, moe_norm_topk) if moe_experts else None
        self.layers = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, head_dim, ffn_hidden, n_experts, eps, i, moe) for i in range(n_layers))
        self.norm = RMSNorm(dim, eps)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Qwen3's normal(0, 0.02) for projections and embeddings, ones for norms; the
        two projections that write into the residual stream (o_proj, down_proj) are
        scaled by 1/sqrt(2 n_layers) (GPT-2) so the stream's variance does not grow with depth."""
        nn.init.normal_(self.embed_tokens.weight, std=std)
        for name, p in self.layers.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif "o_proj" in name or "down_proj" in name:
                nn.init.normal_(p, std=std / (2 * self.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)
        nn.init.ones_(self.norm.weight)

    def new_kv_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        return KVCache(self.n_layers, batch, self.n_kv_heads, self.head_dim, max_len, device)

    def forward(self, h: torch.Tensor, expert_ids: torch.Tensor, attn_mask: torch.Tensor, positions: torch.Tensor,
                kv_cache: KVCache | None = None, return_layer: int | None = None):
        """h (B, L, D) input embeddings, expert_ids (B, L), attn_mask (B, 1, L, S) bool (True = may
        attend; S = cached length + L) or a FlexAttention BlockMask (attention.py), positions (B, L)
        RoPE positions.

        Returns the final-normed hidden (B, L, D); with return_layer=i also the residual
        stream after layers[i] (0-based), un-normed, for REPA. With a kv_cache the keys
        and values are written after its prefix; call kv_cache.commit to keep them.
        """
        routing = Routing(expert_ids, self.n_experts)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        mid = None
        for i, layer in enumerate(self.layers):
            h = layer(h, routing, cos, sin, attn_mask, kv_cache)
            if i == return_layer:
                mid = h
        h = self.norm(h)
        return h if return_layer is None else (h, mid)


def causal_mask(B: int, L: int, device=None) -> torch.Tensor:
    """Plain causal boolean mask (B, 1, L, L), for tests and text-only use."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril().expand(B, 1, L, L)

