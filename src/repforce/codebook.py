"""The rep codebook fitted to data before a run's first step (model.rep_init="kmeans"), and the rep id table
started from the understanding path (model.rep_embed_init="connector"). The trainer calls fit_quantizer once, on
KMEANS_BATCHES batches drawn at KMEANS_STEP onwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runtime
from .model import RFModel
from .quantizer import assign, pool2x2


KMEANS_BATCHES = 64  # batches of training images whose features fit a rep_init="kmeans" codebook (2,048 at 32)
KMEANS_STEP = 10**8  # ... drawn at these steps of the data stream, which no run reaches: the fit sees other images


@torch.no_grad()
def fit_quantizer(model: RFModel, batches: list[dict], rep_pool: int) -> dict:
    """rep_init="kmeans": set the feature centre to the mean of the target encoder's features on these
    batches' images and fit the prototypes to their pooled, centred cells by spherical k-means. Every
    rank fits on its own share; rank 0's fit is then copied to all, so the codebooks agree."""
    raw = torch.cat([model.ema_features(b["images"]).float() for b in batches])  # (n, E, De)
    if hasattr(model, "feat_center"):
        model.feat_center.mean.copy_(raw.reshape(-1, raw.shape[-1]).mean(0))
        model.feat_center.ready.fill_(1.0)
        raw = raw - model.feat_center.mean
    pooled = pool2x2(raw, rep_pool)  # (n, M, De)
    stats = model.quantizer.fit(pooled)
    if runtime.world_size() > 1:
        own = float(runtime.rank() == 0)
        for buf in [model.quantizer.prototypes] + ([model.feat_center.mean] if hasattr(model, "feat_center") else []):
            buf.copy_(runtime.all_sum(buf * own))
    if model.cfg.rep_embed_init == "connector":
        stats["rep_embed_from_connector"] = embed_codes(model, batches, pooled, rep_pool)
    return stats


@torch.no_grad()
def embed_codes(model: RFModel, batches: list[dict], pooled: torch.Tensor, rep_pool: int) -> int:
    """model.rep_embed_init="connector": row k of the rep id table <- the mean, over the cells of these images
    whose pooled target feature (pooled (n, M, De)) is nearest prototype k, of what the understanding path gives
    the backbone for that cell (embed_image: encoder, connector; averaged over the cell's patches). A stage-1
    backbone then reads a rep token as it reads the part of an image it stands for. Codes no cell chose keep
    their init. Returns how many rows were set; rank 0's table is copied to every rank, as the codebook."""
    ids = assign(F.normalize(pooled.float(), dim=-1).flatten(0, 1), model.quantizer.prototypes, balance="none")  # (n M,)
    seen = torch.cat([pool2x2(model.embed_image(b["images"]).float(), rep_pool) for b in batches])  # (n, M, D)
    w = model.rep_embed.weight
    sums = torch.zeros(w.shape, dtype=torch.float32, device=seen.device).index_add_(0, ids, seen.flatten(0, 1))
    counts = torch.bincount(ids, minlength=w.shape[0])
    table = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], w.detach().float())
    if runtime.world_size() > 1:
        table = runtime.all_sum(table * float(runtime.rank() == 0))
    w.copy_(table.to(w.dtype))
    return int((counts > 0).sum())
