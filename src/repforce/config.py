"""Every configuration of a run: one typed dataclass per component, composed into `Config`.

    cfg = presets.preset("shapes", variant="pixel_rf")
    cfg = override(cfg, ["model.dim=128", "train.steps=500"])
    cfg.to_json()  # saved beside every run and checkpoint

Owns ModelConfig (frozen: it identifies a checkpoint), DataConfig, MixConfig, OptimConfig,
TrainConfig, their validation, dotted overrides and JSON. Every bad value is reported as
`<section>.<field>=<value>: <why>` before any work starts. Presets live in presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from .attention import ATTENTIONS
from .encoder import HF_ENCODERS
from .flow import T_EPS, T_MEAN, T_STD
from .packing import parse_sides, side_unit
from .quantizer import BALANCES, INITS, STATS

VARIANTS = ("vlm", "pixel", "pixel_rf", "vae", "vae_rf", "pixel_repa", "pixel_cont")
KINDS = ("wds", "hf", "jsonl")  # real-data source kinds (datasources.py)
TASKS = ("gen", "und", "both")  # what a real-data source feeds
POS_INITS = ("normal", "sincos")  # ModelConfig.pos_init


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "pixel_rf"  # one of VARIANTS
    vocab_size: int = 512  # text vocabulary incl. special tokens; the tokenizer sets it
    dim: int = 256  # backbone width D
    n_layers: int = 6  # backbone blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention)
    head_dim: int = 64  # width per head
    ffn_hidden: int = 704  # SwiGLU hidden width of each MoT expert (2.75 x dim)
    norm_eps: float = 1e-6  # RMSNorm epsilon (Qwen3)
    rope_theta: float = 10000.0  # RoPE base (Qwen3 uses 1e6 for long contexts)
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight
    moe_experts: int = 0  # routed experts per FFN expert (Qwen3-MoE num_experts); 0 = dense SwiGLU
    moe_top_k: int = 0  # routed experts per token (num_experts_per_tok) when moe_experts > 0
    moe_norm_topk: bool = True  # renormalize the top-k router weights (norm_topk_prob)
    image_size: int = 32  # side of the square RGB image in pixels, values in [-1, 1]
    image_channels: int = 3  # channels of `images`
    encoder: str = "vit"  # "vit" (ours, random init) or a transformers tower: "dinov3", "siglip2"
    enc_hf: str = ""  # JSON of the transformers vision config when encoder != "vit" (pretrained.py writes it)
    enc_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # transformers towers: processor mean on [0, 1] pixels
    enc_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # transformers towers: processor std on [0, 1] pixels
    enc_dim: int = 192  # encoder width De
    enc_layers: int = 4  # encoder blocks
    enc_heads: int = 3  # encoder attention heads
    enc_patch: int = 4  # encoder patch side in pixels
    enc_mlp_ratio: float = 4.0  # encoder MLP hidden / width
    encoder_ema: float = 0.999  # decay of the EMA encoder that gives rep / REPA targets, per update_ema_encoder();
    # 1.0 keeps the targets' encoder as initialized (from the vlm stage): stationary targets
    gen_channels: int = 3  # channels of the diffused tensor gen_x (3 pixels, 4 VAE latents)
    gen_size: int = 32  # side of gen_x (32 pixels, 8 latents)
    gen_patch: int = 4  # patch side of gen_x (4 pixels, 1 latents)
    gen_head_hidden: int = 0  # pixel head: 0 = linear, else hidden width of a 2-layer MLP
    image_rope: str = "1d"  # RoPE of the rep and gen slots: "1d" raster positions, or "2d": (t, h, w) with h, w
    # the slot's place on the gen-patch grid, rep cells at the centre of the patches they cover (model.image_rope_positions)
    und_rope: str = "1d"  # RoPE of an understanding image's encoder tokens: "1d" raster positions, or "2d" (needs
    # image_rope="2d"): (t, h, w) with h, w the token's place on the encoder grid, as Qwen2-VL's M-RoPE places image
    # tokens (positions.image_rope_positions); text keeps its 1D positions either way
    und_pos: str = "none"  # absolute position of an understanding image's encoder tokens, added after the
    # connector: "none", or "sincos": a learned table (one row per encoder patch) that starts as a 2D sin-cos of RMS 1,
    # so the tokens' values, not only their RoPE'd keys, say where each patch sits (relation questions)
    pos_init: str = "normal"  # gen_pos / rep_pos at init: "normal" (std 0.02) or "sincos" (2D sin-cos on one
    # grid, each rep cell at the centre of the gen patches it covers: model.grid_sincos)
    rep_pool: int = 2  # rep cell = rep_pool x rep_pool encoder patches, average pooled
    codebook_size: int = 256  # K rep ids (16,384 at scale)
    rep_temperature: float = 0.5  # cosine / temperature before balancing
    rep_momentum: float = 0.99  # prototype momentum m (0.9999 at scale)
    rep_balance: str = "softmax"  # "softmax" (as printed), "sinkhorn" (SwAV) or "none"
    rep_sinkhorn_iters: int = 1  # Sinkhorn iterations when rep_balance="sinkhorn"
    rep_init: str = "random"  # prototypes: "random" unit vectors or "data" (features of the first batch)
    rep_embed_init: str = "normal"  # rep id input table: "normal" (std 0.02, a new parameter), or "connector": with
    # rep_init="kmeans", row k = the mean of what the understanding path (encoder, connector) gives the backbone for the
    # cells of code k in the fit's images, so a rep token means to the stage-1 backbone what it saw (codebook.fit_quantizer)
    rep_balance_stats: str = "batch"  # column sums of balancing: "batch" (as printed) or "running" (quantizer.py)
    rep_dead_after: int = 100  # updates without assignment before a prototype is re-seeded; 0 = never
    rep_center: bool = True  # subtract a running mean of the target features before cosines (quantizer.FeatureCenter)
    rep_center_momentum: float = 0.99  # momentum of that running mean
    t_mean: float = T_MEAN  # logit-normal location of train-time t
    t_std: float = T_STD  # logit-normal scale of train-time t
    t_eps: float = T_EPS  # floor of 1 - t in x -> v
    loss_t_eps: float = 0.0  # > 0: L_FM's weight 1 / (1 - t)^2 capped at 1 / loss_t_eps^2 (flow.fm_loss_capped); 0: as printed
    repa_layer: int = 1  # pixel_repa: 0-based block whose output is aligned
    repa_weight: float = 0.5  # pixel_repa: weight of the alignment loss (REPA's lambda)
    cont_width: int = 256  # pixel_cont: flow head width
    cont_depth: int = 2  # pixel_cont: flow head residual MLP blocks

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"model.{field}={getattr(self, field)!r}: {msg}")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        check(self.encoder in ("vit",) + HF_ENCODERS, "encoder", f"must be one of {('vit',) + HF_ENCODERS}")
        if self.encoder != "vit":
            hf = json.loads(self.enc_hf) if self.enc_hf else {}
            check(bool(hf), "enc_hf", f"encoder={self.encoder!r} needs its transformers config (encoder_fields)")
            patch = hf.get("patch_size", 16)
            check(hf.get("hidden_size") == self.enc_dim, "enc_dim",
                  f"must equal the tower's hidden_size={hf.get('hidden_size')}")
            check((patch if isinstance(patch, int) else patch[0]) == self.enc_patch, "enc_patch",
                  f"must equal the tower's patch_size={patch}")
        check(self.moe_experts == 0 or 0 < self.moe_top_k <= self.moe_experts, "moe_top_k",
              f"must be in [1, moe_experts={self.moe_experts}] for a MoE backbone")
        for field in ("n_kv_heads", "enc_heads", "enc_patch", "gen_patch", "rep_pool"):  # divisors below
            check(getattr(self, field) > 0, field, "must be > 0")
        check(self.n_heads % self.n_kv_heads == 0, "n_heads", f"must be a multiple of n_kv_heads={self.n_kv_heads}")
        check(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE)")
        check(self.image_size % self.enc_patch == 0, "image_size", f"not divisible by enc_patch={self.enc_patch}")
        check(self.enc_dim % self.enc_heads == 0, "enc_dim", f"not divisible by enc_heads={self.enc_heads}")
        check((self.image_size // self.enc_patch) % self.rep_pool == 0, "rep_pool", "must divide the encoder grid")
        check(self.gen_size % self.gen_patch == 0, "gen_size", f"not divisible by gen_patch={self.gen_patch}")
        check(0 <= self.loss_t_eps < 1, "loss_t_eps", "must be in [0, 1)")
        check(self.image_rope in ("1d", "2d"), "image_rope", "must be 1d or 2d")
        check(self.und_rope in ("1d", "2d"), "und_rope", "must be 1d or 2d")
        check(self.und_rope == "1d" or self.image_rope == "2d", "und_rope", "2d needs model.image_rope=2d")
        check(self.und_pos in ("none", "sincos"), "und_pos", "must be none or sincos")
        check(self.pos_init in POS_INITS, "pos_init", f"must be one of {POS_INITS}")
        check(self.rep_balance in BALANCES, "rep_balance", f"must be one of {BALANCES}")
        check(self.rep_init in INITS, "rep_init", f"must be one of {INITS}")
        check(self.rep_embed_init in ("normal", "connector"), "rep_embed_init", "must be normal or connector")
        check(self.rep_embed_init == "normal" or self.rep_init == "kmeans", "rep_embed_init",
              "connector needs model.rep_init=kmeans (the codes are fitted to data before training)")
        check(self.rep_balance_stats in STATS, "rep_balance_stats", f"must be one of {STATS}")
        check(0 <= self.encoder_ema <= 1, "encoder_ema", "must be in [0, 1] (1 = frozen target encoder)")
        check(0 <= self.repa_layer < self.n_layers, "repa_layer", f"must be in [0, n_layers={self.n_layers})")
        if self.variant.startswith("pixel"):
            check(self.gen_size == self.image_size, "gen_size", "pixel variants diffuse the image itself")
            check(self.gen_channels == self.image_channels, "gen_channels", "pixel variants diffuse the image")

    @property
    def has_gen(self) -> bool:  # generation modules and L_FM
        return self.variant != "vlm"

    @property
    def rep_ids(self) -> bool:  # discrete rep tokens: quantizer, id table, rep head, L_Rep
        return self.variant in ("pixel_rf", "vae_rf")

    @property
    def rep_slots(self) -> bool:  # generation samples carry M rep slots
        return self.rep_ids or self.variant == "pixel_cont"

    @property
    def needs_ema_encoder(self) -> bool:  # some target comes from the EMA encoder
        return self.rep_slots or self.variant == "pixel_repa"

    @property
    def n_experts(self) -> int:
        return 1 if self.variant == "vlm" else 3

    @property
    def n_enc(self) -> int:  # encoder tokens E per image
        return (self.image_size // self.enc_patch) ** 2

    @property
    def n_rep(self) -> int:  # rep cells M per image
        return self.n_enc // self.rep_pool ** 2

    @property
    def n_gen(self) -> int:  # gen tokens N per image
        return (self.gen_size // self.gen_patch) ** 2

    @property
    def patch_values(self) -> int:  # P values per gen patch
        return self.gen_patch ** 2 * self.gen_channels



@dataclass(frozen=True)
class DataConfig:
    world: str = "shapes"  # data source: "shapes" or "fashion" (Fashion-MNIST, see worlds/fashion.py)
    fashion_root: str = "/usr/share/datasets/fashion-mnist"  # folder of the Fashion-MNIST IDX files
    fashion_pairs: float = 0.0  # Fashion-MNIST: share of two-item composites ("a bag to the left of a sandal")
    canvas: int = 32  # image side, pixels
    channels: int = 3  # 3: RGB (Fashion-MNIST's gray replicated); 1: gray, Fashion-MNIST only (= model.image_channels)
    gen_fraction: float = 0.5  # share of generation samples in a batch (the vlm variant uses 0)
    prompt_fraction: float = 0.5  # share of generation captions written as ShapesEval-style prompts
    caption_fraction: float = 0.25  # share of understanding samples that ask for the full caption
    qa_turns: int = 1  # shapes: questions per understanding sample, as turns of one conversation on its image
    # (a random subset of the scene's questions in random order); the image's 64 tokens are paid once for all
    drop_text: float = 0.1  # probability of an empty prompt (guidance)
    drop_rep: float = 0.1  # probability of a dropped rep sequence (guidance)
    drop_both: float = 0.0  # probability of dropping both together on top (the pixel-guidance branch; sequence.guidance_drops)
    hard_negatives: float = 0.0  # shapes, training only: share of "is there a <color> <shape>?" "no" questions asked of a
    # confusable pair (absent, its shape or its color in the scene; shapes.confusable, shapes.train_questions)
    relation_turns: int = 0  # shapes, qa_turns > 1: of an image's turns, up to this many are its relation questions
    # ("what shape is left of the red circle?"), drawn first; the rest as before (data.sample_at)
    relation_scenes: float = 0.0  # shapes, training: share of understanding samples whose scene is drawn (from the
    # train stream) among those with a relation question only its relation decides (shapes.relation_decides), asked
    # first with the rest of its turns as before: "left of" and "right of" the same object then differ in answer
    seed: int = 0  # data seed: which slice of the train stream a run sees



@dataclass(frozen=True)
class Source:
    kind: str  # "wds" (tar shards), "hf" (a datasets.save_to_disk folder) or "jsonl" (a folder with index.jsonl)
    path: str  # wds: folder of *.tar (or one .tar); hf: the saved folder; jsonl: folder or .jsonl file
    weight: float = 1.0  # mixture weight, normalized over the sources
    task: str = "both"  # "gen": captions -> generation; "und": conversations -> understanding; "both": captions to both


@dataclass(frozen=True)
class MixConfig:
    sources: tuple[Source, ...] = ()  # the mixture (data.world="mix")
    max_skip_frac: float = 0.05  # stop with an error when more than this share of read samples is bad
    min_checked: int = 200  # samples read before the skip share is enforced
    max_pixels: int = 50_000_000  # larger images are skipped as "giant" (decompression bombs)
    max_text_tokens: int = 256  # captions / conversations are cut to this many tokens
    workers: int = 2  # data-loader worker processes per rank (0 = load in the training process)
    retries: int = 16  # replacement draws for a bad sample before the run stops


def _check_mix(mix: MixConfig, need) -> None:
    """Validate a mixture with need(ok, name, value, why) (validate)."""
    need(len(mix.sources) > 0, "mix.sources", mix.sources, "data.world=mix needs at least one source")
    for i, s in enumerate(mix.sources):
        need(s.kind in KINDS, f"mix.sources[{i}].kind", s.kind, f"must be one of {KINDS}")
        need(s.task in TASKS, f"mix.sources[{i}].task", s.task, f"must be one of {TASKS}")
        need(s.weight > 0, f"mix.sources[{i}].weight", s.weight, "must be > 0")
        need(Path(s.path).exists(), f"mix.sources[{i}].path", s.path, "does not exist")
    need(0 <= mix.max_skip_frac < 1, "mix.max_skip_frac", mix.max_skip_frac, "must be in [0, 1)")
    need(mix.workers >= 0, "mix.workers", mix.workers, "must be >= 0")



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
    name: str = "adamw"  # "adamw", or "muon": Muon on the backbone's hidden matrices, AdamW on the rest (trainable.MuonAdamW)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum


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
    encoder_init: str = ""  # a pretrained world encoder for a fresh run: shipped name or folder (worlds/encoders.py)
    device: str = "cpu"  # "cpu", "cuda" (cuda:LOCAL_RANK under torchrun) or "auto"
    meta_init: bool = False  # build on the meta device, shard, then initialize (models no rank can hold whole)
    act_ckpt: bool = False  # recompute each transformer block's activations in the backward pass
    compile: bool = False  # torch.compile each transformer block
    train_only: str = ""  # comma-separated parameter-name prefixes to train, the rest frozen ("" = all), or
    # "generation": only the parameters generation alone uses (trainable.is_gen_param: gen/rep modules, MoT experts 1 and
    # 2), so every weight the understanding path reads (shared attention and norms, expert 0, embeddings, lm_head,
    # connector, encoder) stays as loaded and the model answers exactly as its stage 1 did
    freeze: str = ""  # comma-separated parameter-name prefixes kept frozen (after train_only), e.g. "encoder."
    max_bad_steps: int = 20  # a step with a non-finite loss or gradient is skipped (no update, EMA untouched);
    # this many in a row stop the run with an error, the last checkpoint kept (1 = stop at the first)
    tokens_per_rank: int = 0  # > 0: each rank's samples packed into rows of this many tokens, a sample attending
    # only to itself, RoPE positions from 0 (packing.py; the paper: 32,768); 0 = one right-padded row per sample
    image_sides: str = ""  # packed rows: square image sides in pixels, one drawn per sample, e.g. "16,24,32" (each a
    # multiple of packing.side_unit, at most model.image_size; pixel and vlm variants); "" = model.image_size
    attention: str = "sdpa"  # "sdpa": dense boolean mask (the reference, CPU); "flex": FlexAttention on a BlockMask of
    # the same rule, no L x L mask (GPU; attention.py). Not part of the model: a checkpoint runs under either


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mix: MixConfig = field(default_factory=MixConfig)  # real data sources when data.world == "mix"
    recipe: str = ""  # the preset and its version that made the run, e.g. "shapes-v2" ("" for older runs)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON-native (tuples as lists), like a saved one

    @staticmethod
    def model_defaults() -> dict:
        """ModelConfig's defaults as config.json holds them: what a field missing from an older run reads as."""
        return json.loads(json.dumps(dataclasses.asdict(ModelConfig())))

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
                      build(MixConfig, mix), str(d.get("recipe", "")))


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its dotted field."""


def validate(cfg: Config) -> Config:
    def need(ok, name, value, why):
        if not ok:
            raise ConfigError(f"{name}={value!r}: {why}")

    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    need(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _check_packing(t, m, need)
    need(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "must be auto, bf16 or fp32")
    need(0 <= t.ema < 1, "train.ema", t.ema, "must be in [0, 1)")
    need(t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, "must be >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    need(t.train_only != "generation" or m.has_gen, "train.train_only", t.train_only,
         f"trains the generation parameters, which model.variant={m.variant!r} does not have")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "must be cosine or constant")
    need(o.name in ("adamw", "muon"), "optim.name", o.name, "must be adamw or muon")
    need(0 <= o.muon_momentum < 1, "optim.muon_momentum", o.muon_momentum, "must be in [0, 1)")
    need(o.warmup >= 0, "optim.warmup", o.warmup, "must be >= 0")
    need(d.world in ("shapes", "fashion", "mix"), "data.world", d.world,
         "must be shapes, fashion or mix (real data: mix.sources)")
    if d.world != "mix":
        need(d.canvas in (32, 64), "data.canvas", d.canvas, "the worlds render 32 or 64")
        need(d.canvas == m.image_size, "data.canvas", d.canvas, f"must equal model.image_size={m.image_size}")
    else:
        _check_mix(cfg.mix, need)
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
    for name in ("gen_fraction", "prompt_fraction", "caption_fraction", "drop_text", "drop_rep", "drop_both", "fashion_pairs", "hard_negatives",
                 "relation_scenes"):
        v = getattr(d, name)
        need(0 <= v <= 1, f"data.{name}", v, "must be in [0, 1]")
    need(d.qa_turns >= 1, "data.qa_turns", d.qa_turns, "must be >= 1")
    need(0 <= d.relation_turns <= d.qa_turns, "data.relation_turns", d.relation_turns,
         f"must be in [0, data.qa_turns={d.qa_turns}]")
    if m.variant.startswith("vae"):
        need(bool(t.vae), "train.vae", t.vae, f"variant {m.variant} needs the folder of a trained VAE (repforce train-vae)")
    return cfg


def _check_packing(t: TrainConfig, m: ModelConfig, need) -> None:
    """train.tokens_per_rank, image_sides and attention (packing.py, attention.py)."""
    need(t.tokens_per_rank >= 0, "train.tokens_per_rank", t.tokens_per_rank, "must be >= 0 (0 = no packing)")
    need(t.attention in ATTENTIONS, "train.attention", t.attention, f"must be one of {ATTENTIONS}")
    need(t.attention != "flex" or t.device != "cpu", "train.attention", t.attention,
         "flex trains on CUDA: FlexAttention has no CPU backward (torch 2.13); sdpa is the CPU path")
    if not t.image_sides:
        return
    try:
        sides = parse_sides(t.image_sides)
    except ValueError:
        sides = ()
    need(bool(sides), "train.image_sides", t.image_sides, "must be comma-separated sides in pixels, e.g. 16,24,32")
    need(t.tokens_per_rank > 0, "train.image_sides", t.image_sides, "needs packed rows (train.tokens_per_rank > 0)")
    need(m.variant.startswith("pixel") or m.variant == "vlm", "train.image_sides", t.image_sides,
         f"several sizes need a pixel or the vlm variant (the {m.variant} variant's VAE encodes one size)")
    unit = side_unit(m)
    for s in sides:
        need(0 < s <= m.image_size and s % unit == 0, "train.image_sides", t.image_sides,
             f"each side must be a multiple of {unit} px (gen patch, rep cell) up to model.image_size={m.image_size}")


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
