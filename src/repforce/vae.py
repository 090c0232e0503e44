"""The separately trained VAE of the `vae` variants: a diffusers AutoencoderKL, 4x downsampling.

    repforce train-vae --out runs/vae --steps 2000

It is trained first, on the same world, and frozen afterwards: the "separately
pretrained" component that Representation Forcing removes, so its cost is reported
apart (vae_meta.json). Latents are shifted and scaled to zero mean and unit variance
over a batch of training images; the factors live in the saved config
(`shift_factor`, `scaling_factor`) as in diffusers' own pipelines.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .sequence import DataConfig, sample_at


def make_vae(latent_channels: int = 4, widths: tuple[int, ...] = (32, 64, 64), canvas: int = 32):
    """An AutoencoderKL with len(widths) - 1 downsamplings (4x for three widths)."""
    from diffusers import AutoencoderKL

    n = len(widths)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=canvas)


def load_vae(folder: str | Path):
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no VAE in {folder} (expected a diffusers AutoencoderKL folder; "
                                f"train one with `repforce train-vae --out {folder}`)")
    # The VAE is small, so load it plainly: the default asks for `accelerate` and warns without it.
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False)


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalized latents (B, C, H/4, W/4); the posterior mean."""
    c = vae.config
    z = vae.encode(images.float()).latent_dist.mean
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    c = vae.config
    return vae.decode(latents.float() / c.scaling_factor + (c.shift_factor or 0.0)).sample.clamp(-1, 1)


def _images(data: DataConfig, start: int, n: int) -> torch.Tensor:
    arr = np.stack([sample_at(data, start + i, gen_fraction=1.0).image for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, H, W)


def train_vae(out: str | Path, steps: int = 2000, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              canvas: int = 32, seed: int = 0, progress: bool = True, data: DataConfig | None = None) -> dict:
    """Train the VAE on the world's generation images; save it with its latent scaling.

    data: the run's data config (world, composites, ...); its canvas and seed are set here."""
    out = Path(out)
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    from .train import autocast

    torch.manual_seed(seed)
    data = replace(data or DataConfig(), canvas=canvas)
    train_data = replace(data, seed=seed + 7919)  # its own slice of the train stream
    vae = make_vae(canvas=canvas)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    bar = tqdm(range(steps), disable=not progress, desc="vae", dynamic_ncols=True)
    for step in bar:
        x = _images(train_data, step * batch_size, batch_size)
        post = vae.encode(x).latent_dist
        with autocast("auto", torch.device("cpu")):  # bf16 only where it is fast: emulated bf16 is ~100x slower
            recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon.float(), x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, 0.5 * (1 + np.cos(np.pi * step / steps)) + 0.05)
        if step % 20 == 0:
            bar.set_postfix(mse=f"{rec.item():.4f}")
    wall = time.time() - t0
    vae.eval()
    with torch.no_grad():
        held = _images(replace(data, seed=seed + 104729), 0, 256)
        z = vae.encode(held).latent_dist.mean
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        recon = decode(vae, encode(vae, held))
        mse = float(F.mse_loss(recon, held))
    psnr = 10 * np.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]
    vae.save_pretrained(str(out))
    meta = {"world": data.world, "steps": steps, "batch_size": batch_size, "wall_s": wall, "heldout_mse": mse, "psnr_db": psnr,
            "shift_factor": shift, "scaling_factor": scale, "params": sum(p.numel() for p in vae.parameters())}
    (out / "vae_meta.json").write_text(json.dumps(meta, indent=1))
    return meta
