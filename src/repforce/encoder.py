"""The image encoder (a small ViT), its connector into the backbone, and the EMA helper.

The encoder reads images for understanding and, through an EMA copy, gives the
representation targets. It returns two views of its last layer: the patch features
BEFORE the final norm (what the representation targets quantize, DESIGN.md) and the
normed features (what the connector feeds to the backbone).

Axes: B batch, C channels, H W image size, p patch, N = (H/p)(W/p) patches,
P = p*p*C patch values, D encoder width, Dm backbone width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P), patches in raster order, values ordered (py, px, c)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, P)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """(B, N, P) -> (B, C, H, W); inverse of patchify."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, p, p, C)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


class ViTBlock(nn.Module):
    """Pre-norm ViT block: LayerNorm, bidirectional multi-head attention, GELU MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.n_heads, D // self.n_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class ImageEncoder(nn.Module):
    """ViT: linear patch embedding, learned position embedding, pre-norm blocks, final LayerNorm."""

    def __init__(self, image_size: int = 32, patch: int = 4, channels: int = 3, dim: int = 192,
                 n_layers: int = 4, n_heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by the encoder patch {patch}")
        self.patch, self.grid, self.dim = patch, image_size // patch, dim
        self.patch_embed = nn.Linear(patch * patch * channels, dim)  # == a stride-p conv on patchify()
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Truncated normal(0.02) for linears and positions, zero biases, unit LayerNorms (ViT / MAE)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [-1, 1] -> (features before the final norm, normed features), each (B, N, D)."""
        x = self.patch_embed(patchify(images, self.patch)) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return x, self.norm(x)


class Connector(nn.Module):
    """Two-layer MLP from the encoder width into the backbone width (LLaVA-1.5)."""

    def __init__(self, enc_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(enc_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        for m in (self.fc1, self.fc2):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, N, D) -> (B, N, Dm)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source for every parameter; buffers are copied.

    The two modules must have the same structure (target is a deepcopy of source).
    """
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)
