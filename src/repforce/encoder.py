"""The image encoder (a small ViT, or a pretrained DINOv3 / SigLIP2), its connector, the EMA helper.

The encoder reads images for understanding and, through an EMA copy, gives the
representation targets. It returns two views of its last layer: the patch features
BEFORE the final norm (what the representation targets quantize, docs/DESIGN.md) and the
normed features (what the connector feeds to the backbone). `build_encoder(cfg)` picks
our own ViT (`encoder="vit"`) or a transformers vision tower (`HFImageEncoder`) behind
the same interface; pretrained.py fills the latter from a local folder.

Axes: B batch, C channels, H W image size, p patch, N = (H/p)(W/p) patches,
P = p*p*C patch values, D encoder width, Dm backbone width.
"""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from .positions import crop_grid


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
        """images (B, C, H, W) in [-1, 1] -> (features before the final norm, normed features), each (B, N, D).
        A square image smaller than image_size takes the top-left of the position grid (packing.py)."""
        pos = self.pos_embed
        if images.shape[-1] != self.grid * self.patch:
            pos = crop_grid(pos[0], images.shape[-1] // self.patch)[None]  # (1, N, D)
        x = self.patch_embed(patchify(images, self.patch)) + pos  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return x, self.norm(x)

    def layers(self) -> nn.ModuleList:
        """The transformer blocks, for per-block FSDP and activation checkpointing."""
        return self.blocks


HF_ENCODERS = ("dinov3", "siglip2")


class HFImageEncoder(nn.Module):
    """A transformers DINOv3 (`DINOv3ViTModel`) or SigLIP2 (`Siglip2VisionModel`) tower as an ImageEncoder.

    Images in [-1, 1] are mapped to [0, 1] and normalized with the model's own
    image-processor mean/std. Only patch tokens come out, in raster order: DINOv3's CLS
    and register tokens are dropped; SigLIP2 has none and its attention-pooling head is
    not built. Parameter names are the transformers ones under `model.`.

    DINOv3's train-time RoPE augmentations (shift, jitter, rescale) and drop-path are
    switched off: they are pretraining regularizers, and the EMA copy of this encoder must
    give deterministic representation targets.
    """

    def __init__(self, kind: str, hf_config: dict, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        import transformers  # heavy: only for a pretrained DINOv3 / SigLIP2 tower

        cfg = {k: v for k, v in hf_config.items() if k not in ("architectures", "transformers_version", "model_type")}
        if kind == "dinov3":
            cfg.update(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None, drop_path_rate=0.0)
            config = transformers.DINOv3ViTConfig(**cfg)
            self.model = transformers.DINOv3ViTModel(config)
            self.n_prefix = 1 + config.num_register_tokens  # CLS + registers lead the sequence
        elif kind == "siglip2":
            cfg["vision_use_head"] = False
            config = transformers.Siglip2VisionConfig(**cfg)
            self.model = transformers.Siglip2VisionModel(config)
            self.n_prefix = 0
        else:
            raise ValueError(f"unknown encoder kind {kind!r}: must be one of {HF_ENCODERS}")
        p = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        if image_size % p:
            raise ValueError(f"image_size={image_size} is not divisible by the encoder patch {p}")
        self.kind, self.patch, self.grid, self.dim = kind, p, image_size // p, config.hidden_size
        self.norm_stats = (tuple(mean), tuple(std))  # per channel, on [0, 1] pixels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def layers(self) -> nn.ModuleList:
        """The transformer blocks, for per-block FSDP and activation checkpointing."""
        return self.model.model.layer if self.kind == "dinov3" else self.model.encoder.layers

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """The transformers initialization (for random or meta-built towers; pretrained.py then loads weights)."""
        self.model.apply(self.model._init_weights)
        self.mean.copy_(torch.tensor(self.norm_stats[0]).view(1, -1, 1, 1))  # buffers are garbage after to_empty
        self.std.copy_(torch.tensor(self.norm_stats[1]).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [-1, 1] -> (features before the final norm, normed features), each (B, N, D)."""
        if images.shape[0] == 0:  # no image on this rank (FSDP's uniform mode): run one blank, keep none of it
            pre, normed = self.forward(images.new_zeros(1, *images.shape[1:]))
            return pre[:0], normed[:0]
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)  # the processor's normalization
        m = self.model
        if self.kind == "dinov3":
            h = m.embeddings(x)  # (B, 1 + registers + N, D)
            h = m.model(h, position_embeddings=m.rope_embeddings(x)).last_hidden_state[:, self.n_prefix:]  # (B, N, D)
            return h, m.norm(h)
        B, _, H, W = x.shape
        shapes = torch.tensor([[H // self.patch, W // self.patch]], device=x.device).expand(B, 2)  # (B, 2) grid
        h = m.embeddings(patchify(x, self.patch), shapes)  # SigLIP2 takes pre-patchified pixels, (py, px, c) order
        h = m.encoder(inputs_embeds=h, attention_mask=None).last_hidden_state  # (B, N, D); all patches are real
        return h, m.post_layernorm(h)


def build_encoder(cfg) -> nn.Module:
    """The encoder a ModelConfig names: our ViT, or a transformers tower described by cfg.enc_hf (JSON)."""
    if cfg.encoder == "vit":
        return ImageEncoder(cfg.image_size, cfg.enc_patch, cfg.image_channels, cfg.enc_dim, cfg.enc_layers,
                            cfg.enc_heads, cfg.enc_mlp_ratio)
    return HFImageEncoder(cfg.encoder, json.loads(cfg.enc_hf), cfg.image_size, cfg.enc_mean, cfg.enc_std)


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
