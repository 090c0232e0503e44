"""The paper's recipe at scale: presets per model size and training stage, and parameter counts.

    repforce train --preset scale_small_s1 --variant vlm --set train.llm=/ckpt/Qwen3-0.6B \\
        --set train.vision=/ckpt/dinov3-vits16 --set 'mix.sources=[...]' --out runs/s1

Two sizes, each in three stages (DESIGN.md section 3, "Recipe at scale"):

    scale        Qwen3-30B-A3B (MoE, 3B active) + DINOv3 ViT-H+/16, K = 16,384   (the paper's)
    scale_small  Qwen3-0.6B (dense) + DINOv3 ViT-S/16, K = 16,384                (one GPU)

    stage 1  `vlm`: only the connector trains (encoder and LLM frozen), understanding data, 256 px
    stage 2  the method (pixel_rf, or any variant): everything trains jointly at 256 px, lr 5e-5,
             parameters new to generation at 4x; starts from stage 1 (--set train.init=runs/s1)
    stage 3  the same at higher resolution (1024 px for scale as in the paper, 512 for
             scale_small), lr 2.5e-5; starts from stage 2, its learned position tables resized

Geometry: 16-px pixel patches and a 16-px encoder, 2 x 2 pooling, so a 256-px image is
256 pixel tokens and 64 rep tokens. The architecture fields are those of the published
checkpoints; when train.llm / train.vision name local folders, their own config.json
overrides them (pretrained.resolve), so another Qwen3 size or a SigLIP2 tower works
with the same presets. Every preset builds on the meta device (`count_params`).
"""

from __future__ import annotations

import json

import torch

from .config import Config, OptimConfig, TrainConfig
from .datasources import MixConfig
from .pretrained import encoder_fields
from .rf import ModelConfig
from .sequence import DataConfig

# published configurations (config.json of the Hugging Face releases), as ModelConfig fields
QWEN3_30B_A3B = dict(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_hidden=768, norm_eps=1e-6,
                     rope_theta=1e6, tie_embeddings=False, vocab_size=151936, moe_experts=128, moe_top_k=8,
                     moe_norm_topk=True)
QWEN3_0_6B = dict(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_hidden=3072, norm_eps=1e-6,
                  rope_theta=1e6, tie_embeddings=True, vocab_size=151936)
_DINOV3 = dict(model_type="dinov3_vit", patch_size=16, num_register_tokens=4, layerscale_value=1.0, rope_theta=100.0,
               layer_norm_eps=1e-5, query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
               image_size=224, num_channels=3)
DINOV3_VITHPLUS16 = dict(_DINOV3, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, use_gated_mlp=True, hidden_act="silu")
DINOV3_VITS16 = dict(_DINOV3, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                     use_gated_mlp=False, hidden_act="gelu")

STAGES = {  # stage -> (variant, lr, steps, trained parameter prefixes); the image side is per size
    1: ("vlm", 1e-3, 10_000, "connector."),  # the paper gives no stage-1 lr: LLaVA's projector rate
    2: ("pixel_rf", 5e-5, 50_000, ""),
    3: ("pixel_rf", 2.5e-5, 20_000, ""),
}


def _model(llm: dict, vision: dict, image_size: int, variant: str) -> ModelConfig:
    return ModelConfig(variant=variant, image_size=image_size, gen_size=image_size, gen_patch=16, rep_pool=2,
                       codebook_size=16384, rep_momentum=0.9999, encoder_ema=0.9999, gen_head_hidden=0,
                       **llm, **encoder_fields(config=vision))


def _preset(llm: dict, vision: dict, stage: int, batch_size: int, side: int) -> Config:
    variant, lr, steps, only = STAGES[stage]
    model = _model(llm, vision, side, variant)
    data = DataConfig(world="mix", canvas=side, gen_fraction=0.0 if variant == "vlm" else 0.5)
    optim = OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, clip=1.0, warmup=500 if stage < 3 else 200,
                        schedule="constant", gen_lr_mult=4.0)
    train = TrainConfig(steps=steps, batch_size=batch_size, precision="bf16", ema=0.9999, log_every=10,
                        ckpt_every=1000, keep=2, device="cuda", meta_init=True, act_ckpt=stage > 1, train_only=only)
    return Config(model, data, optim, train, MixConfig(workers=6))


# Global batches (samples per optimizer step, over all ranks). The paper packs 32,768 tokens per GPU;
# here a batch is a fixed number of samples in one resolution bucket: a 256-px sample is about 400
# tokens, a 1024-px generation sample about 5,200. The sizes below assume 32 GPUs for `scale`
# (about 13K tokens per GPU at 256 px) and one GPU for `scale_small`; set train.batch_size to taste.


def scale_s1() -> Config:
    return _preset(QWEN3_30B_A3B, DINOV3_VITHPLUS16, 1, 1024, 256)


def scale_s2() -> Config:
    return _preset(QWEN3_30B_A3B, DINOV3_VITHPLUS16, 2, 1024, 256)


def scale_s3() -> Config:
    return _preset(QWEN3_30B_A3B, DINOV3_VITHPLUS16, 3, 256, 1024)


def scale_small_s1() -> Config:
    return _preset(QWEN3_0_6B, DINOV3_VITS16, 1, 64, 256)


def scale_small_s2() -> Config:
    return _preset(QWEN3_0_6B, DINOV3_VITS16, 2, 32, 256)


def scale_small_s3() -> Config:
    return _preset(QWEN3_0_6B, DINOV3_VITS16, 3, 16, 512)


# ----------------------------------------------------------------------------- parameter counts


def count_params(cfg: ModelConfig | Config) -> dict[str, int]:
    """Parameter counts of a model built on the meta device (no memory):

    total      every parameter, the EMA encoder included
    no_ema     total minus the EMA encoder (a copy updated by EMA, never by the optimizer)
    backbone   the MoT transformer (embeddings included); encoder: the image encoder
    active     the backbone parameters one token uses, counted as Qwen3 counts "activated"
               parameters (embedding and LM head whole): per layer attention, norms and one
               MoT expert, which for MoE is its router and top_k of its routed experts
    """
    from .rf import RFModel

    m = cfg.model if isinstance(cfg, Config) else cfg
    with torch.device("meta"):
        model = RFModel(m)
    n = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(n.values())
    ema = sum(v for k, v in n.items() if k.startswith("ema_encoder."))
    backbone = sum(v for k, v in n.items() if k.startswith("backbone."))
    ffn = sum(v for k, v in n.items() if k.startswith("backbone.") and ".mlp.experts." in k)
    per_expert = ffn // m.n_experts  # one MoT expert over all layers
    if m.moe_experts:
        router = m.n_layers * m.moe_experts * m.dim
        per_expert = router + (per_expert - router) * m.moe_top_k // m.moe_experts
    head = 0 if m.tie_embeddings else n.get("lm_head.weight", 0)
    active = backbone - ffn + per_expert + head
    return {"total": total, "no_ema": total - ema, "backbone": backbone, "encoder": sum(
        v for k, v in n.items() if k.startswith("encoder.")), "active": active}


if __name__ == "__main__":  # python -m repforce.scale: parameter counts of the presets (meta device, seconds)
    from .config import with_variant

    for name in ("scale_s1", "scale_s2", "scale_small_s1", "scale_small_s2"):
        cfg = with_variant(globals()[name](), "vlm" if name.endswith("s1") else "pixel_rf")
        print(json.dumps({"preset": name, **count_params(cfg)}))
