"""Packed rows: several samples, of several image sizes, in rows of a fixed token count.

    sides = draw_sides(batch, (16, 24, 32))                   # one square side per sample, seeded by the sample
    packed = pack_batch(batch, cfg.model, 4096, sides)        # train.tokens_per_rank = 4096
    batch = data.local_batch(stream, step, 32, seed, dev, packer(cfg))  # what train.py does

The NaViT-style batching of the paper (32,768 packed tokens per GPU, image sizes drawn per
stage up to its maximum). An unpacked batch (sequence.py) holds one right-padded row per
sample; `pack_batch` turns it into rows of exactly `tokens` positions, each filled first-fit
(longest sample first) with whole samples, the rest padding. A packed batch keeps the batch
contract, with per-sample tensors still per sample and three keys more:

    doc         (R, T)  the sample each position belongs to (index into the per-sample
                        tensors), -1 for padding: attention stays inside a sample
    positions   (R, T)  RoPE positions, restarting at 0 in every sample
    image_side  (S,)    each sample's square image side in pixels (only with `sides`);
                        images (S, C, H, W) then hold each image at its top-left, zeros around

Samples are laid out in the order of their index (row by row, left to right), so every
per-sample quantity in sample order fills the slots in raster order (model._fill). Each
sample keeps its own mask rules (causal text and reps, bidirectional image blocks) and its
own loss terms: the losses of a packed batch equal those of the same samples unpacked
(tests/test_packing.py).

Variable resolution, what the model supports: square images only, side s a multiple of
`side_unit` (the gen patch and the rep cell in pixels) up to model.image_size. The image is
resized (antialiased bilinear) from the stream's full size, keeping its (square) aspect, and
its ENC / REP / GEN runs shrink to (s / patch)^2 slots. Learned position tables (gen_pos,
rep_pos, the ViT's pos_embed) hold one square grid of the full size; a smaller image takes its
top-left s x s part (NaViT's absolute positions; positions.crop_grid), and 2D image RoPE
counts rows and columns from 0 as at full size. Not supported: other aspect ratios (the
tables and the h x w grids are square), sides above model.image_size, and the vae variants
at several sides (the frozen VAE encodes one size; packing itself works for every variant).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .positions import image_rope_positions
from .sequence import ENC, GEN, PAD, REP

PER_SAMPLE = ("images", "gen_x", "is_gen", "drop_rep", "noise_seed")  # batch keys indexed by sample
PER_POSITION = ("tokens", "kind", "text_targets")  # batch keys indexed by (row, position)


def side_unit(m) -> int:
    """Smallest side step, in pixels, that keeps whole gen patches, rep cells and encoder patches."""
    enc = m.enc_patch * (m.rep_pool if m.rep_slots else 1)
    return math.lcm(enc, m.gen_patch) if m.has_gen else enc


def parse_sides(text: str) -> tuple[int, ...]:
    """"16,24,32" -> (16, 24, 32); "" -> ()."""
    return tuple(int(s) for s in text.replace(" ", "").split(",") if s)


def slots_at(m, side: int) -> dict[int, int]:
    """Slots per image kind of a sample whose image has this side: {ENC: E, REP: M, GEN: N}."""
    enc = (side // m.enc_patch) ** 2
    gen_side = side * m.gen_size // m.image_size  # pixels, or latents at the VAE's downsampling
    return {ENC: enc, REP: enc // m.rep_pool ** 2 if m.rep_slots else 0, GEN: (gen_side // m.gen_patch) ** 2}


def draw_sides(batch: dict, choices: tuple[int, ...]) -> torch.Tensor:
    """One side per sample, uniform over choices, drawn from the sample's noise seed (data.local_batch),
    so a sample's size does not depend on the batch split or on resuming. (S,) long."""
    seeds = batch["noise_seed"] if "noise_seed" in batch else torch.arange(batch["kind"].shape[0])
    return torch.tensor([choices[np.random.default_rng([int(s), 0x51DE]).integers(len(choices))]
                         for s in seeds.tolist()], dtype=torch.long)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, first-fit decreasing: each sample, longest first, into the first row
    with room. Rows list their samples in index order."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def packer(cfg):
    """The batch transform of a run's train.tokens_per_rank and image_sides (data.local_batch's pack)."""
    t, choices = cfg.train, parse_sides(cfg.train.image_sides)
    return lambda batch: pack_batch(batch, cfg.model, t.tokens_per_rank, draw_sides(batch, choices) if choices else None)


def pack_batch(batch: dict, m, tokens: int, sides: torch.Tensor | None = None) -> dict:
    """An unpacked batch (one right-padded row per sample, full-size images) -> rows of `tokens` positions
    (module docstring). sides (S,): each sample's image side, or None to keep the full size."""
    kind = batch["kind"]
    S = kind.shape[0]
    unknown = set(batch) - set(PER_SAMPLE) - set(PER_POSITION)
    if unknown or "positions" in batch:
        raise ValueError(f"pack_batch takes an unpacked batch of the sequence.py contract; it has {sorted(unknown)}")
    keep = kind != PAD  # (S, L) the sample's own positions: rows are right-padded, nothing inside
    full = m.image_size
    if sides is not None:
        for k in (ENC, REP, GEN):  # drop the slots beyond the smaller image's count, run by run
            n_k = torch.tensor([slots_at(m, int(s))[k] for s in sides.tolist()])  # (S,)
            rank = (kind == k).cumsum(1)  # (S, L) 1-based index inside the run
            keep &= (kind != k) | (rank <= n_k[:, None])
    lengths = keep.sum(1).tolist()
    if max(lengths) > tokens:
        raise ValueError(f"train.tokens_per_rank={tokens}: a sample of {max(lengths)} tokens does not fit a row")
    rows = first_fit(lengths, tokens)
    order = [i for r in rows for i in r]  # new sample j = old sample order[j]
    new_id = torch.empty(S, dtype=torch.long)
    new_id[order] = torch.arange(S)
    R = len(rows)
    out = {k: batch[k].new_full((R, tokens), v) for k, v in (("tokens", 0), ("kind", PAD), ("text_targets", -100))}
    out["positions"] = torch.zeros(R, tokens, dtype=torch.long)
    out["doc"] = torch.full((R, tokens), -1, dtype=torch.long)
    for r, samples in enumerate(rows):
        at = 0
        for i in samples:
            n = lengths[i]
            for k in PER_POSITION:
                out[k][r, at:at + n] = batch[k][i][keep[i]]
            out["positions"][r, at:at + n] = torch.arange(n)
            out["doc"][r, at:at + n] = new_id[i]
            at += n
    idx = torch.tensor(order)
    for k in ("is_gen", "drop_rep", "noise_seed"):
        if k in batch:
            out[k] = batch[k][idx]
    same = m.variant.startswith("pixel") or not m.has_gen  # the image is what is diffused (or nothing is)
    images = batch["images"][idx]
    if sides is not None:
        sides = sides[idx]
        out["image_side"] = sides
        images = images.clone()
        for s in sides.unique().tolist():
            if s != full:
                sel = sides == s
                small = F.interpolate(images[sel], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
                images[sel] = F.pad(small, (0, full - s, 0, full - s))  # top-left, zeros around
    out["images"] = images
    if "gen_x" in batch:
        if not same and sides is not None and bool((sides != full).any()):
            raise ValueError("several image sides need a pixel variant: gen_x is not the image (vae latents)")
        out["gen_x"] = images if same else batch["gen_x"][idx]
    return out


# ----------------------------------------------------------------------------- model side


def size_groups(side: torch.Tensor | None, select: torch.Tensor) -> list[tuple[torch.Tensor, int | None]]:
    """The selected samples (select (S,) bool) grouped by image side: [(sample indices, side)], sides in
    increasing order; side None = the full size (an unpacked batch, or a packed one without sides).
    Always at least one group (empty when nothing is selected)."""
    idx = select.nonzero()[:, 0]
    if side is None:
        return [(idx, None)]
    sides = side[idx]
    groups = [(idx[sides == s], int(s)) for s in sides.unique().tolist()]
    return groups or [(idx, None)]


def crop(x: torch.Tensor, side: int | None) -> torch.Tensor:
    """The top-left side x side of images (n, C, H, W); None = all of it."""
    return x if side is None else x[..., :side, :side]


def by_sample(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-group values [(sample indices (n_g,), values (n_g, m_g, ...))] -> every row of every sample in
    sample order, then in its own order: (1, sum n_g m_g, ...) (a single group is returned as it is)."""
    if len(parts) == 1:
        return parts[0][1]
    owner = torch.cat([i.repeat_interleave(v.shape[1]) for i, v in parts])  # (n,) the sample of each row
    flat = torch.cat([v.reshape(-1, *v.shape[2:]) for _, v in parts])
    return flat[torch.argsort(owner, stable=True)][None]


def split_by_sample(flat: torch.Tensor, parts: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Inverse of by_sample: rows (n, ...) in sample order -> per group (n_g, m_g, ...), groups given as
    [(sample indices, rows per sample m_g)]."""
    if len(parts) == 1:
        return [flat.view(len(parts[0][0]), parts[0][1], *flat.shape[1:])]
    owner = torch.cat([i.repeat_interleave(m) for i, m in parts])
    at = torch.empty_like(owner)
    at[torch.argsort(owner, stable=True)] = torch.arange(len(owner), device=owner.device)  # group row -> sample row
    out, start = [], 0
    for i, m in parts:
        out.append(flat[at[start:start + len(i) * m]].view(len(i), m, *flat.shape[1:]))
        start += len(i) * m
    return out


def at_positions(per_sample: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """A per-sample flag (S,) at every position (B, L): by row when unpacked (doc None), by document
    when packed; False at padding."""
    if doc is None:
        return per_sample[:, None]
    return per_sample[doc.clamp(min=0)] & (doc >= 0)


def rope_positions(kind: torch.Tensor, positions: torch.Tensor, doc: torch.Tensor, cfg) -> torch.Tensor:
    """2D image RoPE positions (B, L, 3) of packed rows (positions.image_rope_positions, per sample): each
    sample's image starts at its own first rep (or gen) slot, its grid side from its own slot counts."""
    S = int(doc.max()) + 1 if doc.numel() else 0
    d = doc.clamp(min=0)
    count = lambda k: torch.zeros(S, dtype=torch.long, device=doc.device).index_add_(  # noqa: E731
        0, d[kind == k], torch.ones_like(d[kind == k]))
    m, n = count(REP), count(GEN)  # (S,) slots per sample

    def first(k):
        x = torch.full((S,), float("inf"), device=doc.device)
        return x.scatter_reduce(0, d[kind == k], positions[kind == k].float(), "amin")

    first_rep = first(REP)
    start = torch.where(torch.isfinite(first_rep), first_rep, first(GEN) - m)  # (S,)
    side = torch.sqrt(n.float()).round().long().clamp(min=1)  # gen grid side per sample
    cells = torch.sqrt(m.float()).round().long().clamp(min=1)
    enc = None
    if getattr(cfg, "und_rope", "1d") == "2d":  # each understanding sample's encoder grid, from its own token count
        e = count(ENC)
        enc = (first(ENC)[d], torch.sqrt(e.float()).round().clamp(min=1)[d])
    return image_rope_positions(kind, positions, cfg, start=start[d], grid=(side[d], cells[d], m[d]), enc=enc)
