"""Who may attend to whom, written once, and attention without a dense mask.

    allowed = may_attend(q_kind, q_pos, q_doc, k_kind, k_pos, k_doc)   # the rule, on broadcastable tensors
    mask = model.attention_mask(kind, pos, doc=doc)                     # dense bool (B, 1, L, L): SDPA, the reference
    bm = block_mask(kind, pos, doc)                                      # the same rule as a FlexAttention BlockMask
    y = flex_attend(q, k, v, bm, gqa=True)                               # backbone.Attention, when its mask is one

The rule (docs/DESIGN.md section 2): a query sees a key of its own document (the sample it
belongs to in a packed row, packing.py; every position of an unpacked row is one document)
that is not padding, and that either comes no later (causal, by RoPE position) or is of the
same image kind, ENC or GEN, as the query (the image blocks are bidirectional; a sample holds
one image, so one block per kind per document).

A dense mask costs L^2 booleans per row (1 GiB at L = 32k) and rules out fused kernels. The
BlockMask keeps, per (query block, key block) of 128 x 128 positions, whether the pair is
empty, full or partial; it is built here from per-block summaries of the layout (documents,
positions, kinds), never from an L x L evaluation, so its cost is O((L / 128)^2) and
FlexAttention skips empty blocks and evaluates `may_attend` only inside partial ones. A
block pair is called empty or full only when the summaries prove it; anything else is
partial, which is always correct (tests/test_attention.py materializes both and compares).

Where the two paths differ: a padding query with no visible key attends to every key in the
dense mask (keeps SDPA finite) and to nothing under FlexAttention (output 0); a query block
of padding only is skipped. Padding outputs are never used. FlexAttention runs compiled on
CUDA (fused, memory O(L)); elsewhere eagerly, which computes the full score matrix and has
no backward on CPU in torch 2.13: the CPU path is for parity tests, SDPA stays its default.

Axes: B rows, L positions, n = L / BLOCK blocks, H heads, Dh head dim.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .sequence import ENC, GEN, PAD

BLOCK = 128  # FlexAttention's block side (its default; the unit of sparsity)
ATTENTIONS = ("sdpa", "flex")  # TrainConfig.attention


def may_attend(qk, qp, qd, kk, kp, kd):
    """The attention rule on broadcastable tensors of query and key kinds, positions and documents
    (qd, kd None: one document). True = may attend."""
    block = (qk == kk) & ((qk == ENC) | (qk == GEN))
    allowed = (kk != PAD) & ((kp <= qp) | block)
    return allowed if qd is None else allowed & (qd == kd)


def _padded(x: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """x (B, L) right-padded with value to length n."""
    return torch.cat([x, x.new_full((x.shape[0], n - x.shape[1]), value)], dim=1)


def block_tables(kind: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor | None = None,
                 block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool (B, n, n) over (query block, key block): full where every pair may attend,
    partial where some may; neither: no pair may (the block is skipped). Proved from per-block
    summaries (min / max of position and document over non-padding positions, kinds present)."""
    B, L = kind.shape
    block = block or BLOCK
    n = -(-L // block)
    doc = torch.zeros_like(kind) if doc is None else doc
    kind, pos, doc = (_padded(x, n * block, v).view(B, n, block) for x, v in ((kind, PAD), (pos, 0), (doc, -1)))
    real = kind != PAD  # (B, n, block)
    big = torch.iinfo(torch.long).max
    lo = lambda x: torch.where(real, x, big).amin(-1)  # noqa: E731  (B, n) over real positions
    hi = lambda x: torch.where(real, x, -big).amax(-1)  # noqa: E731
    any_real, all_real = real.any(-1), real.all(-1)  # (B, n)
    pmin, pmax, dmin, dmax = lo(pos), hi(pos), lo(doc), hi(doc)
    img = (kind == ENC) | (kind == GEN)
    any_img = img.any(-1)
    all_enc, all_gen = (kind == ENC).all(-1), (kind == GEN).all(-1)
    q, k = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])  # (B, n, 1) queries, (B, 1, n) keys
    overlap = q(any_real) & k(any_real) & (q(dmin) <= k(dmax)) & (k(dmin) <= q(dmax))
    # some pair may attend only if some key is causally visible or both blocks hold image slots
    possible = overlap & ((k(pmin) <= q(pmax)) | (q(any_img) & k(any_img)))
    one_doc = q(all_real) & k(all_real) & (q(dmin) == q(dmax)) & (q(dmin) == k(dmin)) & (k(dmin) == k(dmax))
    full = one_doc & ((k(pmax) <= q(pmin)) | (q(all_enc) & k(all_enc)) | (q(all_gen) & k(all_gen)))
    return possible & ~full, full


def _kv_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (num, indices) of a (B, n, n) block selection: per query block, its key blocks first."""
    num = sel.sum(-1, dtype=torch.int32)  # (B, n)
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # selected blocks first, in order
    return num[:, None], idx[:, None]  # (B, 1, n), (B, 1, n, n): one head, broadcast over all


def block_mask(kind: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor | None = None, block: int | None = None):
    """The FlexAttention BlockMask of `may_attend` over rows (B, L) of kinds, positions and documents."""
    B, L = kind.shape
    block = block or BLOCK
    partial, full = block_tables(kind, pos, doc, block)
    n = partial.shape[-1] * block  # mask_mod may be asked about the last block's overhang: pad to it
    kind_, pos_ = _padded(kind, n, PAD), _padded(pos, n, 0)
    doc_ = None if doc is None else _padded(doc, n, -1)

    def mask_mod(b, h, qi, ki):
        qd, kd = (None, None) if doc_ is None else (doc_[b, qi], doc_[b, ki])
        return may_attend(kind_[b, qi], pos_[b, qi], qd, kind_[b, ki], pos_[b, ki], kd)

    return BlockMask.from_kv_blocks(*_kv_lists(partial), *_kv_lists(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(L, L))


_compiled = None  # torch.compile(flex_attention), built on first CUDA use


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool) -> torch.Tensor:
    """FlexAttention of q (B, H, L, Dh) over k, v (B, Hk, L, Dh) under a BlockMask: fused and compiled
    on CUDA, the eager reference elsewhere (forward only on CPU)."""
    global _compiled
    if q.is_cuda:
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        return _compiled(q, k, v, block_mask=mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # "called without torch.compile": expected here, the CPU path is a reference
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
