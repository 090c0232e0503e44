"""Which parameters a run trains, and at what rate: the generation-only set, train.train_only / train.freeze,
and the AdamW groups.

    set_trainable(model, cfg.train)                       # requires_grad from the config
    opt = torch.optim.AdamW(param_groups(model, cfg), ...)
"""

from __future__ import annotations

import torch

from .config import Config, TrainConfig

GEN_MODULES = ("gen_embed", "gen_pos", "t_embed", "gen_head", "rep_", "null_rep", "cont_", "repa_proj")


def is_gen_param(name: str) -> bool:
    """Parameters that exist for generation only: the gen/rep modules and the experts 1, 2."""
    return name.startswith(GEN_MODULES) or ".mlp.experts.1." in name or ".mlp.experts.2." in name


def _prefixes(spec: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def set_trainable(model: torch.nn.Module, t: TrainConfig) -> None:
    """requires_grad per train.train_only (name prefixes, or "generation": is_gen_param, so the understanding
    path stays as loaded), then off for train.freeze's prefixes. Neither set: left as the model built it."""
    keep, frozen = _prefixes(t.train_only), _prefixes(t.freeze)
    for name, p in model.named_parameters():
        if t.train_only == "generation":
            p.requires_grad_(is_gen_param(name))
        elif keep:
            p.requires_grad_(name.startswith(keep))
        if frozen and name.startswith(frozen):
            p.requires_grad_(False)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: decay on matrices of linear layers only; gen parameters at gen_lr_mult."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim == 2 and "embed" not in name and not name.endswith("_pos")
        groups.setdefault((decay, is_gen_param(name)), []).append(p)
    out = []
    for (decay, gen), params in groups.items():
        mult = cfg.optim.gen_lr_mult if gen else 1.0
        out.append({"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                    "lr": cfg.optim.lr * mult, "lr_mult": mult})
    return out
