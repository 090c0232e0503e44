"""Which parameters a run trains, and how: the generation-only set, train.train_only / train.freeze, the
optimizer groups, and the optimizer (optim.name: AdamW, or Muon on the backbone's hidden matrices).

    set_trainable(model, cfg.train)                       # requires_grad from the config
    opt = make_optimizer(model, cfg)                      # AdamW, or MuonAdamW
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


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The backbone blocks' 2D weights (attention projections, dense FFN experts): what Muon updates. Embeddings,
    heads, position tables, the encoder and the norms are not hidden matrices and stay with AdamW."""
    return p.ndim == 2 and name.startswith("backbone.layers.")


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Optimizer groups: decay on matrices of linear layers only; gen parameters at gen_lr_mult; with
    optim.name=muon the hidden matrices in groups of their own ("muon": True)."""
    muon = cfg.optim.name == "muon"
    groups: dict[tuple[bool, bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim == 2 and "embed" not in name and not name.endswith("_pos")
        groups.setdefault((decay, is_gen_param(name), muon and is_hidden_matrix(name, p)), []).append(p)
    out = []
    for (decay, gen, use_muon), params in groups.items():
        mult = cfg.optim.gen_lr_mult if gen else 1.0
        out.append({"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                    "lr": cfg.optim.lr * mult, "lr_mult": mult, "muon": use_muon})
    return out


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over param_groups, or with optim.name=muon MuonAdamW (Muon on the hidden matrices, AdamW on the rest)."""
    o = cfg.optim
    if o.name == "muon":
        return MuonAdamW(param_groups(model, cfg), lr=o.lr, betas=o.betas, momentum=o.muon_momentum)
    return torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=o.betas, fused=False)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: g (m, n) -> about U V^T of its SVD, singular values near 1
    (Jordan et al. 2024, the coefficients of torch.optim.Muon). In g's dtype (fp32 here): torch.optim.Muon runs
    it in bf16, which CPUs without AVX512-BF16 emulate about 100x slower than fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.AdamW):
    """Muon (Jordan et al. 2024) on the groups marked "muon", torch's AdamW on the others, as one optimizer (one
    state_dict, one lr schedule over param_groups). Muon's update is the orthogonalized Nesterov momentum,
    scaled by 0.2 sqrt(max(m, n)) to the RMS of an AdamW update (Liu et al. 2025, "Muon is scalable"; torch's
    adjust_lr_fn="match_rms_adamw"), so both kinds of group take optim.lr and optim.weight_decay as they are."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float = 0.95):
        super().__init__(groups, lr=lr, betas=betas, weight_decay=0.0, fused=False)
        for g in self.param_groups:
            g.setdefault("muon", False)
            g.setdefault("momentum", momentum)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        try:  # AdamW's own step over its groups only
            self.param_groups = [g for g in groups if not g["muon"]]
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if not group["muon"]:
                continue
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # a "step" as AdamW's state has, which its load_state_dict expects of every state
                    state["step"], state["momentum_buffer"] = torch.zeros(()), torch.zeros_like(p)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)
                update = orthogonalize(p.grad.lerp(buf, beta).float())  # Nesterov
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * max(p.shape) ** 0.5)
