"""Where the image slots sit: 2D sin-cos tables for gen_pos / rep_pos (model.pos_init="sincos") and the
multimodal RoPE positions of the rep and gen slots (model.image_rope="2d"). Both lay the rep cells over
the gen-patch grid, each cell at the centre of the patches it covers (recipe shapes-v3)."""

from __future__ import annotations

import math

import torch

from .sequence import ENC, GEN, REP


def image_rope_positions(kind: torch.Tensor, positions: torch.Tensor, cfg, start: torch.Tensor | None = None,
                         grid: tuple | None = None, enc: tuple | None = None):
    """Multimodal RoPE positions (B, L, 3) float for model.image_rope="2d".

    Every slot but the rep and gen slots keeps its 1D position p as (p, p, p), which is 1D RoPE
    exactly (so text, and understanding unless und_rope="2d", are unchanged). The image of a generation sample, whose
    first slot (the first rep slot, or the first gen slot without reps) has 1D position `start`,
    gets t = start and (h, w) = start + its place on the gen-patch grid: gen patch (r, c) at
    (r, c), rep cell (i, j) at the centre of the patches it covers. A gen patch and the rep cell
    over it are then at relative offset < 1 in h and w, whatever their distance in the sequence.
    The layout is [M rep slots][N gen slots] with consecutive positions, so a slot's index is
    its position minus start (minus M for gen slots). start (B,) or (B, 1): given by a caller
    whose chunk begins inside the image (a cached rep step); else the chunk's first rep
    position, or its first gen position minus M. Packed rows (packing.rope_positions) give
    start (B, L) and grid = (gen grid side, rep cells per side, M), each (B, L): per position,
    from the sample it belongs to.

    With cfg.und_rope="2d" the encoder tokens of an understanding image get the same treatment on the
    encoder grid: t = the 1D position of the image's first token, (h, w) = t + (row, column), as
    Qwen2-VL's M-RoPE places image tokens; the text around it keeps its 1D positions. A row holds one
    understanding image, whose tokens are all in the chunk; packed rows give enc = (first encoder
    position, encoder grid side), each (B, L), per position from its sample (packing.rope_positions)."""
    p = positions.float()
    out = p[..., None].expand(*p.shape, 3).clone()
    if getattr(cfg, "und_rope", "1d") == "2d":
        _place_encoder_tokens(out, kind, p, enc)
    if grid is None:
        m = cfg.n_rep if cfg.rep_slots else 0
        side = cfg.gen_size // cfg.gen_patch
        cells = math.isqrt(cfg.n_rep) if m else 1
    else:
        side, cells, m = grid
    is_rep, is_gen = kind == REP, kind == GEN
    if not (is_rep.any() or is_gen.any()):
        return out
    if start is None:
        big = torch.full_like(p, float("inf"))
        first_rep = torch.where(is_rep, p, big).min(dim=1).values
        first_gen = torch.where(is_gen, p, big).min(dim=1).values - m
        start = torch.where(torch.isfinite(first_rep), first_rep, first_gen)
    start = start.float() if start.shape == p.shape else start.float().reshape(-1, 1).expand_as(p)  # (B, L)
    idx = p - start - is_gen.float() * m  # slot index inside its block
    gen_r, gen_c = torch.div(idx, side, rounding_mode="floor"), torch.remainder(idx, side)
    scale = side / cells
    rep_r = (torch.div(idx, cells, rounding_mode="floor") + 0.5) * scale - 0.5
    rep_c = (torch.remainder(idx, cells) + 0.5) * scale - 0.5
    r = torch.where(is_rep, rep_r, gen_r)
    c = torch.where(is_rep, rep_c, gen_c)
    img = (is_rep | is_gen)
    out[..., 0] = torch.where(img, start, out[..., 0])
    out[..., 1] = torch.where(img, start + r, out[..., 1])
    out[..., 2] = torch.where(img, start + c, out[..., 2])
    return out


def _place_encoder_tokens(out: torch.Tensor, kind: torch.Tensor, p: torch.Tensor, enc: tuple | None) -> None:
    """out (B, L, 3) in place: encoder tokens at (t, t + row, t + column), t their image's first position."""
    is_enc = kind == ENC
    if not is_enc.any():
        return
    if enc is None:  # one image per row: its first encoder position and grid side
        first = torch.where(is_enc, p, torch.full_like(p, float("inf"))).min(dim=1, keepdim=True).values
        side = is_enc.sum(dim=1, keepdim=True).float().sqrt().round().clamp(min=1)
        start, side = first.expand_as(p), side.expand_as(p)
    else:
        start, side = enc[0].float(), enc[1].float()
    idx = p - start
    r, c = torch.div(idx, side, rounding_mode="floor"), torch.remainder(idx, side)
    out[..., 0] = torch.where(is_enc, start, out[..., 0])
    out[..., 1] = torch.where(is_enc, start + r, out[..., 1])
    out[..., 2] = torch.where(is_enc, start + c, out[..., 2])


def grid_sincos(dim: int, side: int, cells: int, scale: float = 0.1) -> torch.Tensor:
    """2D sin-cos position embeddings (cells**2, dim) of a cells x cells grid laid over a side x side grid
    of gen patches: cell (i, j) sits at the centre of the patches it covers, so a rep cell and the gen
    patches under it get neighbouring embeddings (MAE's 2D sin-cos, half the width per axis), scaled to
    RMS `scale`: the size of the inputs it is added to, not 0.7 of the raw sinusoid."""
    quarter = dim // 4
    # angular frequencies from pi (wavelength 2 patches) down to wavelength 4 * side: sharp at this grid's size
    freqs = math.pi * (2.0 * side) ** (-torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
    c = (torch.arange(cells, dtype=torch.float64) + 0.5) * side / cells - 0.5  # centres in gen-patch units
    y, x = torch.meshgrid(c, c, indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (y, x) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)  # dim not a multiple of 4
    return (emb * scale / emb.pow(2).mean().sqrt()).float()


def crop_grid(table: torch.Tensor, side: int) -> torch.Tensor:
    """The rows of a square raster-order table (n * n, D) that cover the top-left side x side of its grid
    (NaViT's absolute positions: a smaller image takes the full size's first rows and columns)."""
    full = math.isqrt(table.shape[0])
    if side == full:
        return table
    return table.view(full, full, -1)[:side, :side].reshape(side * side, -1)  # (side^2, D)
