"""Pretrained world encoders: the small worlds' counterpart of DINOv3, trained before any vlm stage.

    repforce pretrain-encoder --world shapes --out src/repforce/assets/shapes_encoder    # minutes on 2 cores
    repforce train --preset shapes --variant vlm --set train.encoder_init=shapes_encoder --out runs/vlm

The paper's understanding encoder starts as a pretrained DINOv3, so its patch features carry
objects and layout from the first step and its rep tokens have something to force. Ours are
ViTs of the preset's encoder shape, trained on the train split only, with no generation
objective and no text: each patch feature is trained to read what lies under its cell,
through linear heads that are thrown away afterwards.

What we chose and why: dense supervision from the scene graph (the shapes world knows, for
every cell, the color, shape and size of the object covering it, and whether the object's
center lies in it), not a self-supervised objective. A self-supervised ViT (DINO, MAE) is the
faithful counterpart, but on 2 CPU cores its features would need far longer to separate six
colors and three shapes per cell; what the method needs from the encoder is what DINOv3's
features offer, attributes that a linear probe reads off each patch, and the scene graph gives
that in minutes. The center head makes instances countable from patch features. Pixels are
the only input, as for DINOv3: the heads see no text and the encoder never sees held-out scenes.

A shipped encoder is a folder `encoder.safetensors` (the ImageEncoder's state dict, fp16 to stay
under 5 MB) + `encoder.json` (version, probe accuracies, sha256, the encoder's shape); the
sha256 is checked on load (`pretrained.world_encoder_state`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..encoder import ImageEncoder
from . import shapes

VERSION = "shapes-encoder-v1"
HEADS = {"color": 1 + len(shapes.COLORS), "shape": 1 + len(shapes.SHAPES), "size": 3, "center": 2}  # 0 = background
UNDER = 0.5  # a cell is "under" an object when the object covers at least this share of it


def cell_labels(scene: shapes.Scene, grid: int) -> dict[str, np.ndarray]:
    """Per-cell targets (grid, grid) int64 of a scene: color, shape, size of the object covering the most of
    the cell (0 = background: nothing covers UNDER of it), center (1 where an object's box center lies),
    and `cover`, the share of the cell that object covers (float32)."""
    n = scene.canvas
    cell = n // grid
    best = np.zeros((grid, grid), np.float32)
    out = {k: np.zeros((grid, grid), np.int64) for k in HEADS}
    for o in scene.objects:
        cov = shapes.coverage(o.shape, o.cx, o.cy, shapes.box_side(o.size, n), n)
        share = cov.reshape(grid, cell, grid, cell).mean(axis=(1, 3))  # (grid, grid)
        mine = (share > best) & (share >= UNDER)
        out["color"][mine] = 1 + shapes.COLORS.index(o.color)
        out["shape"][mine] = 1 + shapes.SHAPES.index(o.shape)
        out["size"][mine] = 1 + ("small", "large").index(o.size)
        best = np.maximum(best, share)
        r, c = min(int(o.cy // cell), grid - 1), min(int(o.cx // cell), grid - 1)
        out["center"][r, c] = 1
    out["cover"] = best
    return out


def scene_batch(split: str, start: int, count: int, grid: int, canvas: int = 32):
    """Images (count, 3, canvas, canvas) in [-1, 1] and per-cell labels (count, grid * grid) per head."""
    scenes = shapes.scenes(split, start, count, canvas)
    x = torch.from_numpy(np.stack([shapes.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = [cell_labels(s, grid) for s in scenes]
    y = {k: torch.from_numpy(np.stack([lab[k].reshape(-1) for lab in labels])) for k in (*HEADS, "cover")}
    return x, y


class Heads(nn.Module):
    """Linear per-patch readouts of the pretraining objective (discarded after it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, N, D) -> {head: (B, N, classes)}
        return {k: h(feats) for k, h in self.heads.items()}


POSITION = ("row", "column")  # probe targets read off the patch index, not the scene


def probe(encoder: ImageEncoder, n_train: int = 1500, n_test: int = 500, steps: int = 300, seed: int = 0,
          normed: bool = True, targets: tuple[str, ...] = ("color", "shape")) -> dict:
    """A fresh linear probe on the frozen patch features, the encoder's output (normed, what the connector
    reads) or with normed=False the features before the final norm (what rep tokens quantize): trained on
    train-stream scenes, accuracy on held-out ones, on the cells an object covers (>= UNDER of them) and
    on all cells. Returns {"color": .., "shape": .., "color_all": .., "shape_all": ..}. targets may also name
    "row" and "column", the patch's place on the encoder grid: how much absolute position the features carry
    (scored on the cells an object covers, and on all)."""
    torch.manual_seed(seed)
    grid = encoder.grid
    encoder.eval()

    def feats(split, n):
        x, y = scene_batch(split, 10_000_000 if split == "train" else 0, n, grid)
        with torch.no_grad():
            f = torch.cat([encoder(x[i:i + 250])[int(normed)] for i in range(0, n, 250)])  # (n, N, D)
        idx = torch.arange(grid * grid).expand(n, -1)
        y = {**y, "row": idx // grid, "column": idx % grid}
        return f.reshape(-1, f.shape[-1]), {k: v.reshape(-1) for k, v in y.items()}

    f_tr, y_tr = feats("train", n_train)
    f_te, y_te = feats("heldout", n_test)
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    out = {}
    for head in targets:
        lin = nn.Linear(f_tr.shape[1], grid if head in POSITION else HEADS[head])
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        for _ in range(steps):  # full-batch: the features fit in memory
            loss = F.cross_entropy(lin(f_tr), y_tr[head])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = lin(f_te).argmax(-1) == y_te[head]
        covered = y_te["color"] > 0
        out[head] = float(right[covered].float().mean())
        out[f"{head}_all"] = float(right.float().mean())
    return out


def pretrain(out: str | Path, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, dim: int = 192,
             n_layers: int = 4, n_heads: int = 3, patch: int = 4, canvas: int = 32, seed: int = 0,
             progress: bool = True, probe_scenes: tuple[int, int] = (1500, 500)) -> dict:
    """Train a shapes-world encoder on the train stream's scene graphs, probe it (on probe_scenes = (train,
    held-out) scenes), save it with its sha256."""
    torch.manual_seed(seed)
    encoder = ImageEncoder(canvas, patch, 3, dim, n_layers, n_heads)
    encoder.init_weights()
    heads = Heads(dim)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    t0, bar = time.time(), tqdm(range(steps), disable=not progress, desc="encoder", dynamic_ncols=True)
    for step in bar:
        x, y = scene_batch("train", seed * 100_000_000 + step * batch_size, batch_size, encoder.grid, canvas)
        logits = heads(encoder(x)[1])
        losses = {k: F.cross_entropy(v.reshape(-1, v.shape[-1]), y[k].reshape(-1)) for k, v in logits.items()}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
    wall = time.time() - t0
    acc = probe(encoder, *probe_scenes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "encoder.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in encoder.state_dict().items()}, str(weights))
    meta = {"version": VERSION, "world": "shapes", "objective": "per-cell color, shape, size and center (scene graph)",
            "probe_heldout": acc, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_wall_s": round(wall, 1), "encoder": {"image_size": canvas, "patch": patch, "dim": dim,
                                                        "n_layers": n_layers, "n_heads": n_heads},
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (out / "encoder.json").write_text(json.dumps(meta, indent=1))
    return meta
