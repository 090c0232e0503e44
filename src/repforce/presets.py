"""Presets: functions returning a Config, from the tests' tiny model to the paper's recipe at scale.

    cfg = preset("shapes", variant="pixel_rf")        # what `repforce train --preset shapes` runs
    repforce train --preset scale_small_s1 --variant vlm --set train.llm=/ckpt/Qwen3-0.6B \\
        --set train.vision=/ckpt/dinov3-vits16 --set 'mix.sources=[...]' --out runs/s1

    tiny         seconds per step on a laptop CPU: for tests
    shapes       the real small run of the shapes world (about 10M parameters, 32x32 images)
    shapes_v6    recipe shapes-v6 as recorded (v5 with relation questions first; the shapes_vlm v4)
    shapes_v5    recipe shapes-v5 as recorded (v4 with hard "is there" negatives; the shapes_vlm v3)
    shapes_v4    recipe shapes-v4 as recorded (the shipped `shapes`: v3 with 80% generation samples)
    shapes_v3    recipe shapes-v3 as recorded (k-means codebook held, 2D positions, L_FM weight capped; half the batch generation)
    shapes_v2    recipe shapes-v2 as recorded (the shipped shapes_vlm's; online quantizer, 1D image positions)
    shapes_v1    the same as the recorded study ran it (random encoder, before recipe shapes-v2)
    scale        Qwen3-30B-A3B (MoE, 3B active) + DINOv3 ViT-H+/16, K = 16,384   (the paper's)
    scale_small  Qwen3-0.6B (dense) + DINOv3 ViT-S/16, K = 16,384                (one GPU)

The scale sizes come in three stages (docs/DESIGN.md section 3, "Recipe at scale"):

    stage 1  `vlm`: only the connector trains (encoder and LLM frozen), understanding data, 256 px
    stage 2  the method (pixel_rf, or any variant): everything trains jointly at 256 px, lr 5e-5,
             parameters new to generation at 4x; starts from stage 1 (--set train.init=runs/s1)
    stage 3  the same at higher resolution (1024 px for scale as in the paper, 512 for
             scale_small), lr 2.5e-5; starts from stage 2, its learned position tables resized

Geometry at scale: 16-px pixel patches and a 16-px encoder, 2 x 2 pooling, so a 256-px image
is 256 pixel tokens and 64 rep tokens. The architecture fields are those of the published
checkpoints; when train.llm / train.vision name local folders, their own config.json
overrides them (pretrained.config_for_folders), so another Qwen3 size or a SigLIP2 tower
works with the same presets. `python -m repforce.presets` prints their parameter counts
(built on the meta device, model.count_params).
"""

from __future__ import annotations

import json
from dataclasses import replace

from .config import (
    Config,
    ConfigError,
    DataConfig,
    MixConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    with_variant,
)
from .model import count_params
from .pretrained import encoder_fields

# ----------------------------------------------------------------------------- small worlds


def preset_tiny() -> Config:
    """Seconds per step on a laptop CPU: for tests."""
    model = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_hidden=128, enc_dim=48,
                        enc_layers=1, enc_heads=2, codebook_size=32, cont_width=32, cont_depth=1, repa_layer=0,
                        rep_dead_after=20)
    return Config(model, DataConfig(), OptimConfig(lr=3e-3, warmup=5),
                  TrainConfig(steps=40, batch_size=8, log_every=5, ckpt_every=20, ema=0.9,
                              precision="fp32"))  # tests compare numbers: the same on every CPU


SHAPES_RECIPE = "shapes-v7"  # Config.recipe of the shapes preset; bumped whenever its defaults change


def preset_shapes() -> Config:
    """The real small run of the shapes world: about 10M parameters (6M active per token), 32x32 images.

    Recipe shapes-v7 (docs/results/findings.md, "The vlm learns relations"): shapes-v6 with half of the
    understanding images drawn among scenes that have a relation question only the relation decides,
    asked first (data.relation_scenes=0.5). Under v6 the vlm gave the same answer to "left of" and
    "right of" the same object 93% of the time; the shipped shapes_vlm v5 was trained 1,200 steps on
    such questions alone and then 600 under this recipe (relation questions 0.78 -> 0.99 held-out).
    Generation is v4's."""
    v6 = preset_shapes_v6()
    return replace(v6, data=replace(v6.data, relation_scenes=0.5), recipe=SHAPES_RECIPE)


def preset_shapes_v6() -> Config:
    """Recipe shapes-v6 as recorded (docs/results/findings.md, "Relation questions first"): shapes-v5 with up to
    three of each understanding image's eight questions its relation questions ("what shape is left
    of the red circle?", data.relation_turns=3), the recipe of the shipped shapes_vlm v4 (1,200 more
    steps from v3 under it: VQA 0.927 -> 0.955 on 1,000 held-out questions, is-there 0.92 -> 0.99).
    The relation questions themselves barely moved (0.77 -> 0.77 on 370 held-out ones). Generation is v4's."""
    v5 = preset_shapes_v5()
    return replace(v5, data=replace(v5.data, relation_turns=3), recipe="shapes-v6")


def preset_shapes_v5() -> Config:
    """Recipe shapes-v5 as recorded (docs/results/findings.md, "... the vlm's "is there" diagnosed, hard
    negatives"): shapes-v4 with every "no" existence question asked of an absent pair that shares its
    shape or its color with an object in the scene (data.hard_negatives=1.0). The shapes-v2 vlm answered
    "is there a red circle?" by the shape alone (every blue circle: "yes"); these questions taught the
    shapes_vlm v3 to check both: VQA 0.863 -> 0.937, is-there 0.73 -> 0.92. Generation is v4's."""
    v4 = preset_shapes_v4()
    return replace(v4, data=replace(v4.data, hard_negatives=1.0), recipe="shapes-v5")


def preset_shapes_v4() -> Config:
    """Recipe shapes-v4 as recorded (docs/results/findings.md, "Recipe shapes-v4"; the shipped `shapes`):
    shapes-v3 with 80% of each batch generation samples instead of 50%. The vlm stage (understanding
    only) is unchanged; in the pixel stage understanding only needs keeping, and the renderer is what
    learns slowly: at 2,400 steps ShapesEval 0.40 against v3's 0.21 (0.65 at 4,800), for VQA 0.805
    against 0.910."""
    v3 = preset_shapes_v3()
    return replace(v3, data=replace(v3.data, gen_fraction=0.8), recipe="shapes-v4")


def preset_shapes_v3() -> Config:
    """Recipe shapes-v3 as recorded (docs/results/findings.md, "Recipe shapes-v3"), shapes-v2 with stationary rep
    tokens and image positions a pixel patch can find its rep cell by: the codebook is fitted by
    k-means to the frozen encoder's features before the first step and then held (momentum 1, no
    balancing, feature centre held), so an id means the same thing at every step; gen_pos and
    rep_pos start as one 2D sin-cos grid, and the rep and gen slots take 2D RoPE positions (each
    rep cell at the centre of the patches it covers); and L_FM's weight capped at t = 0.7 (Min-SNR-5,
    loss_t_eps 0.3), so the noisy half of the path, where only the rep tokens say where things are,
    is not drowned by the near-clean end."""
    v2 = preset_shapes_v2()
    return replace(v2, model=replace(v2.model, rep_init="kmeans", rep_momentum=1.0, rep_balance="none",
                                     rep_center_momentum=1.0, pos_init="sincos", image_rope="2d", loss_t_eps=0.3),
                   recipe="shapes-v3")


def preset_shapes_v2() -> Config:
    """Recipe shapes-v2 as recorded (docs/results/findings.md, "Recipe shapes-v2"), shapes-v1 with: the vlm
    stage starts from the shipped world encoder (the small world's DINOv3) and keeps it frozen in every
    stage, as the paper's stage 1 keeps its DINOv3; eight questions per understanding image (the
    image is paid once, the answers are 8x the supervision); the pixel-guidance branch (text and
    reps dropped together) trained on 10% of generation samples; train-time t centred on the middle
    of the path (logit-normal 0, 1: a 32-px image's edges settle at t > 0.7, which JiT's 256-px
    setting almost never visits)."""
    v1 = preset_shapes_v1()
    return replace(v1, model=replace(v1.model, t_mean=0.0, t_std=1.0), data=replace(v1.data, qa_turns=8, drop_both=0.1),
                   train=replace(v1.train, encoder_init="shapes_encoder", freeze="encoder."), recipe="shapes-v2")


def preset_shapes_v1() -> Config:
    """The shapes preset as the recorded study ran it (recipe shapes-v1): everything from random weights,
    one question per image, t from JiT's logit-normal (-0.8, 0.8), no extra guidance-branch drop."""
    model = ModelConfig(dim=256, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden=576, enc_dim=192,
                        enc_layers=4, enc_heads=3, codebook_size=256, repa_layer=2,
                        # stable, broad targets on a small batch of mostly empty canvases (quantizer.py docstring)
                        rep_init="data", rep_balance_stats="running", rep_momentum=0.999, rep_dead_after=0,
                        # targets from the stage-1 (vlm) encoder, frozen: with any EMA (0.999, 0.9999) this small,
                        # still-learning encoder drifts, prototypes it leaves die, and codebook use narrows (docs/results/findings.md)
                        encoder_ema=1.0)
    return Config(model, DataConfig(), OptimConfig(lr=1e-3, warmup=200), TrainConfig(steps=2000, batch_size=32),
                  recipe="shapes-v1")


# ----------------------------------------------------------------------------- the paper's recipe at scale

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


# The quantizer as the paper's Appendix B prints it (docs/DESIGN.md, "Representation targets"): random unit
# prototypes, one softmax-over-positions balancing step on the batch, momentum 0.9999, no feature centering, no
# re-seeding of idle prototypes. The small worlds' changes (centering, re-seeding after 100 idle updates, data
# init, running statistics) answer 32 mostly empty 32 px canvases per batch; nothing has measured them at
# scale, where the paper's batch of thousands is what its step was written for, so the scale presets keep it.
PAPER_QUANTIZER = dict(rep_temperature=0.5, rep_momentum=0.9999, rep_balance="softmax", rep_balance_stats="batch",
                       rep_init="random", rep_dead_after=0, rep_center=False)


def _model(llm: dict, vision: dict, image_size: int, variant: str) -> ModelConfig:
    return ModelConfig(variant=variant, image_size=image_size, gen_size=image_size, gen_patch=16, rep_pool=2,
                       codebook_size=16384, encoder_ema=0.9999, gen_head_hidden=0, **PAPER_QUANTIZER,
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


PRESETS = {"tiny": preset_tiny, "shapes": preset_shapes, "shapes_v6": preset_shapes_v6, "shapes_v5": preset_shapes_v5, "shapes_v4": preset_shapes_v4, "shapes_v3": preset_shapes_v3, "shapes_v2": preset_shapes_v2, "shapes_v1": preset_shapes_v1, "scale_s1": scale_s1,
           "scale_s2": scale_s2,
           "scale_s3": scale_s3, "scale_small_s1": scale_small_s1, "scale_small_s2": scale_small_s2,
           "scale_small_s3": scale_small_s3}


def preset(name: str, variant: str = "pixel_rf") -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: must be one of {tuple(PRESETS)}")
    return with_variant(PRESETS[name](), variant)


if __name__ == "__main__":  # python -m repforce.presets: parameter counts of the scale presets (meta device, seconds)
    for name in ("scale_s1", "scale_s2", "scale_small_s1", "scale_small_s2"):
        cfg = preset(name, "vlm" if name.endswith("s1") else "pixel_rf")
        print(json.dumps({"preset": name, **count_params(cfg)}))
