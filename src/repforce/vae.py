"""The separately trained VAE of the `vae` variants: a diffusers AutoencoderKL, 4x downsampling.

    repforce train-vae --out runs/vae --steps 2000     # train.train_vae

It is trained first, on the same world, and frozen afterwards: the "separately
pretrained" component that Representation Forcing removes, so its cost is reported
apart (vae_meta.json). Latents are shifted and scaled to zero mean and unit variance
over a batch of training images; the factors live in the saved config
(`shift_factor`, `scaling_factor`) as in diffusers' own pipelines.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_vae(latent_channels: int = 4, widths: tuple[int, ...] = (32, 64, 64), canvas: int = 32):
    """An AutoencoderKL with len(widths) - 1 downsamplings (4x for three widths)."""
    from diffusers import AutoencoderKL  # heavy: only the vae variants need diffusers

    n = len(widths)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=canvas)


def load_vae(folder: str | Path):
    """A local diffusers AutoencoderKL folder, frozen."""
    from diffusers import AutoencoderKL  # heavy: only the vae variants need diffusers

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


class VAEEncoder:
    """The frozen VAE of the vae variants: images -> latents scaled to unit variance."""

    def __init__(self, folder: str, device: torch.device):
        self.vae = load_vae(folder).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.vae, images)
