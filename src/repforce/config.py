"""Typed run configuration: one dataclass per component, presets as functions, dotted overrides.

    cfg = preset("shapes", variant="pixel_rf")
    cfg = override(cfg, ["model.dim=128", "train.steps=500"])
    cfg.to_json()  # saved beside every run and checkpoint

The model config is frozen: it identifies a checkpoint. Every bad value is reported as
`<section>.<field>=<value>: <why>` before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, replace

from .datasources import MixConfig, Source
from .rf import VARIANTS, ModelConfig
from .sequence import DataConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (the paper's)
    weight_decay: float = 0.1  # on matrices only; norms, biases, embeddings and tables are exempt
    clip: float = 1.0  # global gradient-norm clip
    warmup: int = 100  # linear warmup steps
    schedule: str = "cosine"  # "cosine" (to min_lr_frac) or "constant" after warmup
    min_lr_frac: float = 0.1  # cosine floor as a fraction of lr
    gen_lr_mult: float = 1.0  # lr multiplier of parameters new to generation (4 at scale)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps in total (a resumed run stops here too)
    batch_size: int = 32  # samples per step
    seed: int = 0  # model init, noise and time sampling
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where it is fast (GPU, AVX512-BF16/AMX CPU)
    ema: float = 0.999  # decay of the weight EMA used for sampling and evaluation
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept
    threads: int = 0  # torch threads; 0 = leave torch's default
    vae: str = ""  # vae variants: the folder written by `repforce train-vae`
    init: str = ""  # start from this run's (or checkpoint's) weights, e.g. a vlm run or the previous stage
    llm: str = ""  # local Hugging Face Qwen3 / Qwen3-MoE folder: backbone weights and tokenizer (pretrained.py)
    vision: str = ""  # local DINOv3 / SigLIP2 folder: encoder weights (pretrained.py)
    device: str = "cpu"  # "cpu", "cuda" (cuda:LOCAL_RANK under torchrun) or "auto"
    meta_init: bool = False  # build on the meta device, shard, then initialize (models no rank can hold whole)
    act_ckpt: bool = False  # recompute each transformer block's activations in the backward pass
    compile: bool = False  # torch.compile each transformer block
    train_only: str = ""  # comma-separated parameter-name prefixes to train, the rest frozen ("" = all)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mix: MixConfig = field(default_factory=MixConfig)  # real data sources when data.world == "mix"

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON-native (tuples as lists), like a saved one

    @staticmethod
    def from_json(d: dict) -> "Config":
        def build(cls, values):
            hints = typing.get_type_hints(cls)
            kw = {}
            for f in dataclasses.fields(cls):
                if f.name in values:
                    v = values[f.name]
                    kw[f.name] = tuple(v) if isinstance(v, list) and "tuple" in str(hints[f.name]) else v
            return cls(**kw)

        mix = dict(d.get("mix", {}))
        mix["sources"] = [Source(**s) if isinstance(s, dict) else s for s in mix.get("sources", [])]
        return Config(build(ModelConfig, d.get("model", {})), build(DataConfig, d.get("data", {})),
                      build(OptimConfig, d.get("optim", {})), build(TrainConfig, d.get("train", {})),
                      build(MixConfig, mix))


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its dotted field."""


def validate(cfg: Config) -> Config:
    def need(ok, name, value, why):
        if not ok:
            raise ConfigError(f"{name}={value!r}: {why}")

    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    need(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    need(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "must be auto, bf16 or fp32")
    need(0 <= t.ema < 1, "train.ema", t.ema, "must be in [0, 1)")
    need(t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, "must be >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "must be cosine or constant")
    need(o.warmup >= 0, "optim.warmup", o.warmup, "must be >= 0")
    need(d.world in ("shapes", "fashion", "mix"), "data.world", d.world,
         "must be shapes, fashion or mix (real data: mix.sources)")
    if d.world != "mix":
        need(d.canvas in (32, 64), "data.canvas", d.canvas, "the worlds render 32 or 64")
        need(d.canvas == m.image_size, "data.canvas", d.canvas, f"must equal model.image_size={m.image_size}")
    else:
        from .datasources import check_mix

        check_mix(cfg.mix, need)
    need(d.channels in (1, 3), "data.channels", d.channels, "must be 3 (RGB) or 1 (gray)")
    need(d.channels == 3 or d.world == "fashion", "data.channels", d.channels,
         f"gray images need data.world=fashion (the {d.world} world is in color)")
    need(m.image_channels == d.channels, "model.image_channels", m.image_channels, f"must equal data.channels={d.channels}")
    need(d.channels == 3 or not m.variant.startswith("vae"), "data.channels", d.channels,
         f"variant {m.variant} encodes with an RGB VAE (train-vae): use data.channels=3")
    need(d.channels == 3 or m.encoder == "vit", "data.channels", d.channels,
         f"model.encoder={m.encoder!r} is a pretrained RGB tower: use data.channels=3")
    need(t.device in ("cpu", "cuda", "auto") or t.device.startswith("cuda:"), "train.device", t.device,
         "must be cpu, cuda, cuda:N or auto")
    need(m.image_size % m.gen_patch == 0 or not m.variant.startswith("pixel"), "model.image_size", m.image_size,
         f"not divisible by model.gen_patch={m.gen_patch}")
    for name in ("gen_fraction", "prompt_fraction", "caption_fraction", "drop_text", "drop_rep", "fashion_pairs"):
        v = getattr(d, name)
        need(0 <= v <= 1, f"data.{name}", v, "must be in [0, 1]")
    if m.variant.startswith("vae"):
        need(bool(t.vae), "train.vae", t.vae, f"variant {m.variant} needs the folder of a trained VAE (repforce train-vae)")
    return cfg


def with_variant(cfg: Config, variant: str) -> Config:
    """The config of another variant: geometry of the diffused tensor and the data mix follow it."""
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r}: must be one of {VARIANTS}")
    m = cfg.model
    if variant.startswith("vae"):  # 4x-downsampling VAE latents: as many tokens as pixel patches
        down = 4
        geo = dict(gen_channels=4, gen_size=m.image_size // down, gen_patch=max(1, m.gen_patch // down))
    else:
        geo = dict(gen_channels=m.image_channels, gen_size=m.image_size, gen_patch=4 if m.gen_patch == 1 else m.gen_patch)
    data = replace(cfg.data, gen_fraction=0.0 if variant == "vlm" else (cfg.data.gen_fraction or 0.5))
    return replace(cfg, model=replace(m, variant=variant, **geo), data=data)


# ----------------------------------------------------------------------------- presets


def preset_tiny() -> Config:
    """Seconds per step on a laptop CPU: for tests."""
    model = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_hidden=128, enc_dim=48,
                        enc_layers=1, enc_heads=2, codebook_size=32, cont_width=32, cont_depth=1, repa_layer=0,
                        rep_dead_after=20)
    return Config(model, DataConfig(), OptimConfig(lr=3e-3, warmup=5),
                  TrainConfig(steps=40, batch_size=8, log_every=5, ckpt_every=20, ema=0.9))


def preset_shapes() -> Config:
    """The real small run of the shapes world: about 10M parameters (6M active per token), 32x32 images."""
    model = ModelConfig(dim=256, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden=576, enc_dim=192,
                        enc_layers=4, enc_heads=3, codebook_size=256, repa_layer=2,
                        # stable, broad targets on a small batch of mostly empty canvases (quantizer.py docstring)
                        rep_init="data", rep_balance_stats="running", rep_momentum=0.999, rep_dead_after=0,
                        # targets from the stage-1 (vlm) encoder, frozen: with any EMA (0.999, 0.9999) this small,
                        # still-learning encoder drifts, prototypes it leaves die, and codebook use narrows (findings.md)
                        encoder_ema=1.0)
    return Config(model, DataConfig(), OptimConfig(lr=1e-3, warmup=200), TrainConfig(steps=2000, batch_size=32))


def _scale(name: str):
    """A preset of scale.py (pretrained Qwen3 + DINOv3 recipes), imported on first use."""
    def build() -> Config:
        from . import scale

        return getattr(scale, name)()
    return build


PRESETS = {"tiny": preset_tiny, "shapes": preset_shapes}
PRESETS.update({f"{size}_s{n}": _scale(f"{size}_s{n}") for size in ("scale", "scale_small") for n in (1, 2, 3)})


def preset(name: str, variant: str = "pixel_rf") -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: must be one of {tuple(PRESETS)}")
    return with_variant(PRESETS[name](), variant)


# ----------------------------------------------------------------------------- overrides


def _coerce(text: str, typ, name: str):
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if typ in (int, float, str):
            return typ(text)
        if origin is tuple and typing.get_args(typ)[0] is Source:  # mix.sources=[{"kind": ..., "path": ...}, ...]
            return tuple(Source(**s) for s in json.loads(text))
        if origin is tuple:
            return tuple(float(x) for x in text.strip("()[] ").split(","))
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: not a valid {getattr(typ, '__name__', typ)}") from None


def override(cfg: Config, assignments: list[str]) -> Config:
    """Apply `section.field=value` strings, each checked against the field's type.

    A section's fields change together, so fields that must agree can move at once
    (model.image_size=512 model.gen_size=512 for a pixel variant). data.channels carries the
    model's image channels with it (and the diffused channels of a pixel variant)."""
    changes: dict[str, dict] = {}
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"override {a!r}: expected section.field=value")
        key, text = a.split("=", 1)
        if key.count(".") != 1:
            raise ConfigError(f"override {a!r}: expected section.field=value, e.g. model.dim=128")
        section, name = key.split(".")
        if section not in ("model", "data", "optim", "train", "mix"):
            raise ConfigError(f"{key}: unknown section {section!r} (model, data, optim, train, mix)")
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ConfigError(f"{key}: {type(sub).__name__} has no field {name!r}")
        changes.setdefault(section, {})[name] = _coerce(text, hints[name], key)
    if "channels" in changes.get("data", {}):
        ch, model = changes["data"]["channels"], changes.setdefault("model", {})
        model.setdefault("image_channels", ch)
        if model.get("variant", cfg.model.variant).startswith("pixel"):
            model.setdefault("gen_channels", ch)
    for section, fields in changes.items():
        try:
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **fields)})
        except ValueError as e:  # ModelConfig checks itself on construction
            raise ConfigError(str(e)) from None
    return cfg
