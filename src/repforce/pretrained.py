"""Weights from elsewhere: local Hugging Face folders (Qwen3 / Qwen3-MoE, DINOv3 / SigLIP2, a diffusers
VAE's geometry) and an earlier stage's checkpoint (`init_from_vlm`).

    fields = {**pretrained.llm_fields("/ckpt/Qwen3-0.6B"), **pretrained.encoder_fields("/ckpt/dinov3-vits16")}
    cfg = replace(model_cfg, **fields, vocab_size=pretrained.vocab_size("/ckpt/Qwen3-0.6B", tok))
    model = RFModel(cfg)
    report = pretrained.load_hf(model, llm="/ckpt/Qwen3-0.6B", vision="/ckpt/dinov3-vits16")
    report = pretrained.init_from_vlm(model, checkpoint.read(run)[0]["ema"])   # the next stage

The backbone is Qwen3 with Hugging Face's parameter names (backbone.py), so the map is a
plain renaming, tensor by tensor, read lazily from the folder's safetensors:

    model.X                                   -> backbone.X
    model.layers.i.mlp.{gate,up,down}_proj    -> backbone.layers.i.mlp.experts.{0,1,2}.*    (dense: 3 copies)
    model.layers.i.mlp.gate.weight (router)   -> backbone.layers.i.mlp.experts.{0,1,2}.gate.weight
    model.layers.i.mlp.experts.j.gate_proj    -> row j of backbone.layers.i.mlp.experts.{0,1,2}.gate_proj
    lm_head.weight                            -> lm_head.weight (the embedding when the LLM ties them)

so every MoT expert starts as a copy of the LLM's FFN (of its whole expert bank and
router for Qwen3-MoE). Rows of the embedding and the LM head past the LLM's own
tokenizer (our special tokens, and any padding rows) start at the mean of the
pretrained rows. The image encoder (and its EMA copy) are the transformers tower's
weights under `encoder.model.`. Every target may be an FSDP-sharded DTensor: each rank
copies only its own shard of each tensor (runtime.copy_full_). Nothing is
downloaded: every path must be a local folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .runtime import copy_full_

ASSETS = Path(__file__).parent / "assets"  # shipped weights: world encoders, judges
WRAPPERS = re.compile(r"(_checkpoint_wrapped_module\.|_orig_mod\.|_fsdp_wrapped_module\.)")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv3's processor statistics (LVD-1689M models)


class PretrainedError(ValueError):
    """A local folder that cannot be used as asked."""


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise PretrainedError(f"no config.json in {folder} (expected a local Hugging Face model folder)")
    return json.loads(path.read_text())


class Weights(Mapping):
    """The tensors of a folder's *.safetensors files, opened lazily (sharded checkpoints included)."""

    def __init__(self, folder: str | Path, pattern: str = "*.safetensors"):
        files = sorted(Path(folder).glob(pattern))
        if not files:
            raise PretrainedError(f"no *.safetensors in {folder}")
        self.where: dict[str, object] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for k in handle.keys():
                self.where[k] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise PretrainedError(f"tensor {name!r} missing from the checkpoint")
        return self.where[name].get_tensor(name)


# ----------------------------------------------------------------------------- configs


def _rope_theta(c: dict) -> float:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise PretrainedError(f"RoPE type {kind!r} is not supported (only the default RoPE of Qwen3)")
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def llm_fields(folder: str | Path) -> dict:
    """ModelConfig fields of a local Qwen3 or Qwen3-MoE folder (vocab_size: see `vocab_size`)."""
    c = read_config(folder)
    kind = c.get("model_type")
    if kind not in ("qwen3", "qwen3_moe"):
        raise PretrainedError(f"{folder}: model_type={kind!r}, expected qwen3 or qwen3_moe")
    if c.get("attention_bias"):
        raise PretrainedError(f"{folder}: attention_bias=true is not Qwen3's attention")
    fields = dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                  n_kv_heads=c["num_key_value_heads"],
                  head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                  ffn_hidden=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_theta=_rope_theta(c),
                  tie_embeddings=bool(c.get("tie_word_embeddings", False)), vocab_size=c["vocab_size"],
                  moe_experts=0, moe_top_k=0)
    if kind == "qwen3_moe":
        n = c.get("num_experts", c.get("num_local_experts"))
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise PretrainedError(f"{folder}: mixed dense/sparse layers (mlp_only_layers, decoder_sparse_step) "
                                  "are not supported; every released Qwen3-MoE is sparse in all layers")
        fields.update(ffn_hidden=c["moe_intermediate_size"], moe_experts=n, moe_top_k=c["num_experts_per_tok"],
                      moe_norm_topk=bool(c.get("norm_topk_prob", False)))
    return fields


def vocab_size(folder: str | Path, tok) -> int:
    """Embedding rows for an LLM with our tokenizer: its own rows, or more if the added tokens need them."""
    return max(read_config(folder)["vocab_size"], len(tok))


def _vision_config(c: dict) -> tuple[str, dict]:
    kind = c.get("model_type")
    if kind == "siglip2":  # a full SigLIP2 (text + vision) folder
        c, kind = c["vision_config"], "siglip2_vision_model"
    if kind == "dinov3_vit":
        return "dinov3", c
    if kind == "siglip2_vision_model":
        return "siglip2", c
    raise PretrainedError(f"model_type={kind!r}: expected dinov3_vit, siglip2 or siglip2_vision_model")


def _processor_stats(folder: Path, kind: str) -> tuple[tuple, tuple]:
    path = folder / "preprocessor_config.json"
    if path.exists():
        p = json.loads(path.read_text())
        if "image_mean" in p and "image_std" in p:
            return tuple(float(v) for v in p["image_mean"]), tuple(float(v) for v in p["image_std"])
    return IMAGENET if kind == "dinov3" else ((0.5,) * 3, (0.5,) * 3)  # each family's published default


def encoder_fields(folder: str | Path | None = None, config: dict | None = None) -> dict:
    """ModelConfig fields of a DINOv3 or SigLIP2 tower, from a local folder (its config and processor
    mean/std) or from a transformers config dict (presets: no folder needed to build on meta)."""
    folder = Path(folder) if folder is not None else None
    kind, c = _vision_config(read_config(folder) if config is None else config)
    mean, std = _processor_stats(folder, kind) if folder is not None else (
        IMAGENET if kind == "dinov3" else ((0.5,) * 3, (0.5,) * 3))
    keep = {k: v for k, v in c.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    patch = c.get("patch_size", 16)
    return dict(encoder=kind, enc_hf=json.dumps(keep, sort_keys=True), enc_dim=c["hidden_size"],
                enc_patch=patch if isinstance(patch, int) else patch[0], enc_layers=c["num_hidden_layers"],
                enc_heads=c["num_attention_heads"], enc_mlp_ratio=c["intermediate_size"] / c["hidden_size"],
                enc_mean=tuple(mean), enc_std=tuple(std))


def vae_fields(folder: str | Path, image_size: int, tokens_like_patch: int = 16) -> dict:
    """Geometry of the diffused latents for a diffusers AutoencoderKL folder: a latent patch such that the
    latent tokens are as many as pixel patches of side `tokens_like_patch` (paper: equal sequence lengths)."""
    c = read_config(folder)
    if c.get("_class_name") not in (None, "AutoencoderKL"):
        raise PretrainedError(f"{folder}: _class_name={c.get('_class_name')!r}, expected an AutoencoderKL")
    down = 2 ** (len(c["block_out_channels"]) - 1)
    if image_size % down:
        raise PretrainedError(f"image_size={image_size} is not divisible by the VAE's downsampling {down}")
    return dict(gen_channels=c["latent_channels"], gen_size=image_size // down,
                gen_patch=max(1, tokens_like_patch // down))


def config_for_folders(cfg, tok):
    """The run config with the architecture of its local folders: train.llm (backbone, and the
    vocabulary with our tokens), train.vision (encoder), train.vae for the vae variants
    (latent geometry, as many latent tokens as the pixel variants have patches)."""
    t, m = cfg.train, cfg.model
    fields: dict = {}
    if t.llm:
        fields |= llm_fields(t.llm) | {"vocab_size": vocab_size(t.llm, tok)}
    if t.vision:
        fields |= encoder_fields(t.vision)
    if t.vae and m.variant.startswith("vae") and (Path(t.vae) / "config.json").exists():
        fields |= vae_fields(t.vae, m.image_size, tokens_like_patch=m.image_size * m.gen_patch // m.gen_size)
    return replace(cfg, model=replace(m, **fields)) if fields else cfg


# ----------------------------------------------------------------------------- weights


def clean_name(name: str) -> str:
    """A parameter name without the wrappers of activation checkpointing, compile and FSDP1."""
    return WRAPPERS.sub("", name)


def _backbone_source(name: str, w: Weights):
    """A function giving the full tensor for our backbone/lm_head parameter `name`, or None if not from the LLM."""
    if name == "lm_head.weight":
        key = "lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"
        return lambda: w.get(key)
    if not name.startswith("backbone."):
        return None
    hf = "model." + name[len("backbone."):]
    hf = re.sub(r"\.mlp\.experts\.\d+\.", ".mlp.", hf)  # every MoT expert reads the one FFN
    m = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.(gate_proj|up_proj|down_proj)", hf)
    if m:  # a MoE bank: stack the routed experts (per-expert keys, or transformers 5's fused ones)
        base, proj = m.groups()
        if f"{base}.experts.0.{proj}.weight" in w:
            def stack():
                rows, j = [], 0
                while f"{base}.experts.{j}.{proj}.weight" in w:
                    rows.append(w.get(f"{base}.experts.{j}.{proj}.weight"))
                    j += 1
                return torch.stack(rows)  # (R, F, D) or (R, D, F)
            return stack
        if proj == "down_proj":
            return lambda: w.get(f"{base}.experts.down_proj")
        half = 0 if proj == "gate_proj" else 1
        return lambda: w.get(f"{base}.experts.gate_up_proj").chunk(2, dim=1)[half]  # (R, 2F, D) -> (R, F, D)
    return lambda: w.get(hf)


def _encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tower's weights under its transformers module names (transformers' own loader maps the checkpoint's
    names, e.g. DINOv3's `layer.i` -> `model.layer.i`, SigLIP2's `vision_model.` prefix). Small enough to
    hold whole on every rank (ViT-H+ is 0.84B parameters)."""
    import transformers  # heavy: only when a vision tower is loaded

    kind, _ = _vision_config(read_config(folder))
    cls = transformers.DINOv3ViTModel if kind == "dinov3" else transformers.Siglip2VisionModel
    model = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return model.state_dict()


def _encoder_source(name: str, state: dict[str, torch.Tensor]):
    m = re.fullmatch(r"(?:ema_)?encoder\.model\.(.+)", name)
    if not m:
        return None
    if m.group(1) not in state:
        raise PretrainedError(f"{name}: no {m.group(1)!r} in the vision tower's weights")
    return lambda: state[m.group(1)]


def _original_vocab(folder: Path) -> int | None:
    """Tokens of the LLM's own tokenizer (before ours are added), if the folder has one."""
    try:
        from transformers import AutoTokenizer  # heavy: only when an LLM is loaded

        return len(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except Exception:
        return None


@torch.no_grad()
def load_hf(model, llm: str | Path | None = None, vision: str | Path | None = None) -> dict[str, list[str]]:
    """Copy LLM and/or vision-tower weights into an RFModel (plain or FSDP-sharded); returns the names
    under "loaded" and "vocab_mean" (rows set to the mean embedding). Shapes must match the config."""
    report: dict[str, list[str]] = {"loaded": [], "vocab_mean": []}
    sources = []
    if llm is not None:
        llm = Path(llm)
        w, hf_cfg = Weights(llm), read_config(llm)
        n_orig = min(_original_vocab(llm) or hf_cfg["vocab_size"], hf_cfg["vocab_size"])
        sources.append(lambda n, w=w: _backbone_source(n, w))
    if vision is not None:
        tower = _encoder_state(Path(vision))
        sources.append(lambda n: _encoder_source(n, tower))
    if not sources:
        return report
    tied = model.cfg.tie_embeddings
    for raw, param in model.named_parameters():
        name = clean_name(raw)
        if tied and name == "lm_head.weight":
            continue
        fn = next((f for f in (s(name) for s in sources) if f is not None), None)
        if fn is None:
            continue
        value = fn()
        if name in ("backbone.embed_tokens.weight", "lm_head.weight"):
            value = _grow_vocab(value, param.shape[0], n_orig)
            report["vocab_mean"].append(name)
        if tuple(value.shape) != tuple(param.shape):
            raise PretrainedError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}; "
                                  "build the ModelConfig with llm_fields / encoder_fields of the same folder")
        copy_full_(param, value)
        report["loaded"].append(name)
    for buf_owner in (getattr(model, "encoder", None), getattr(model, "ema_encoder", None)):
        if vision is not None and hasattr(buf_owner, "norm_stats"):  # non-persistent buffers of the tower
            buf_owner.mean.copy_(torch.tensor(buf_owner.norm_stats[0]).view(1, -1, 1, 1))
            buf_owner.std.copy_(torch.tensor(buf_owner.norm_stats[1]).view(1, -1, 1, 1))
    return report


def _grow_vocab(table: torch.Tensor, rows: int, n_orig: int) -> torch.Tensor:
    """(V, D) pretrained rows -> (rows, D); every row from n_orig on starts at the mean of the first n_orig."""
    if rows < n_orig:
        raise PretrainedError(f"vocab_size={rows} is smaller than the LLM tokenizer's {n_orig} tokens")
    out = table.new_empty(rows, table.shape[1])
    keep = min(rows, table.shape[0])
    out[:keep] = table[:keep]
    out[n_orig:] = table[:n_orig].float().mean(dim=0).to(table.dtype)  # new tokens: the mean embedding
    return out


# ----------------------------------------------------------------------------- world encoders


def world_encoder_state(name: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The ImageEncoder weights (fp32) and metadata of a pretrained world encoder: a shipped one by name
    (assets/<name>, e.g. "shapes_encoder") or a folder written by `repforce pretrain-encoder`. The
    weights' sha256 must match the one recorded beside them."""
    folder = Path(name)
    if not (folder / "encoder.json").exists() and (ASSETS / str(name) / "encoder.json").exists():
        folder = ASSETS / str(name)
    weights, meta_path = folder / "encoder.safetensors", folder / "encoder.json"
    if not weights.exists() or not meta_path.exists():
        shipped = sorted(d.name for d in ASSETS.iterdir() if (d / "encoder.json").exists())
        raise PretrainedError(f"train.encoder_init={str(name)!r}: no encoder.safetensors + encoder.json there "
                              f"(shipped: {', '.join(shipped) or 'none'}; `repforce pretrain-encoder --out DIR`)")
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta.get("sha256"):
        raise PretrainedError(f"{weights}: sha256 {digest[:12]}... does not match encoder.json "
                              f"({str(meta.get('sha256'))[:12]}...)")
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    return state, meta


@torch.no_grad()
def load_world_encoder(model, name: str | Path, world: str | None = None) -> dict[str, list[str]]:
    """Copy a pretrained world encoder into model.encoder and its EMA copy (plain or sharded);
    returns the names under "loaded". Its shape must be the model's (enc_dim, enc_layers, ...),
    and its world the run's (data.world) when given."""
    if model.cfg.encoder != "vit":
        raise PretrainedError(f"train.encoder_init needs model.encoder='vit', not {model.cfg.encoder!r}")
    state, meta = world_encoder_state(name)
    if world and meta.get("world") and meta["world"] != world:
        raise PretrainedError(f"train.encoder_init={str(name)!r} was trained on the {meta['world']} world, this run is "
                              f"data.world={world}: set train.encoder_init= (none) or an encoder of that world")
    report: dict[str, list[str]] = {"loaded": []}
    for prefix in ("encoder.", "ema_encoder."):
        for raw, param in list(model.named_parameters()) + list(model.named_buffers()):
            name_ = clean_name(raw)
            if not name_.startswith(prefix):
                continue
            key = name_[len(prefix):]
            if key not in state or tuple(state[key].shape) != tuple(param.shape):
                raise PretrainedError(f"{name_}: the world encoder {meta.get('version')} has "
                                      f"{tuple(state[key].shape) if key in state else 'no such tensor'}, the model "
                                      f"{tuple(param.shape)}: set the model's encoder fields to {meta.get('encoder')}")
            copy_full_(param, state[key])
            report["loaded"].append(name_)
    return report


# ----------------------------------------------------------------------------- stage init


@torch.no_grad()
def init_from_vlm(model, state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Start an RFModel of a generation variant from a `vlm` checkpoint (docs/DESIGN.md, training protocol).

    Loads every tensor whose name and shape match; an FFN expert absent from the
    checkpoint starts as a copy of its understanding expert (experts.0); the EMA
    encoder starts as the loaded encoder; a learned position table of another grid
    size (a stage at another resolution) is resized bilinearly ("resized"); everything
    else keeps its fresh init. state_dict may be any mapping with keys() and [] (a
    lazily read safetensors file), and the model may be FSDP-sharded.
    Returns the names under "loaded", "copied" and "fresh" (fresh = new parameters,
    e.g. for a higher learning rate).
    """
    keys = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): k for k in state_dict.keys()}  # lazy: read on use
    report: dict[str, list[str]] = {"loaded": [], "copied": [], "fresh": []}
    for raw, tensor in model.state_dict().items():
        name = re.sub(r"_checkpoint_wrapped_module\.|_orig_mod\.", "", raw)  # activation-checkpoint wrappers
        key, bucket = name, "loaded"
        if key not in keys:
            key, bucket = re.sub(r"(\.mlp\.experts\.)\d+\.", r"\g<1>0.", name), "copied"
        if name.startswith("ema_encoder."):
            key, bucket = "encoder." + name[len("ema_encoder."):], "copied"
        value = state_dict[keys[key]] if key in keys else None
        if value is not None and value.shape != tensor.shape and name.endswith(_GRIDS):
            value, bucket = _resize_grid(value, tensor.shape), "resized"  # a stage at another resolution
        if value is not None and value.shape == tensor.shape:
            copy_full_(tensor, value)
            report.setdefault(bucket, []).append(name)
        else:
            report["fresh"].append(name)
    return report


_GRIDS = ("gen_pos", "rep_pos", "und_pos", "encoder.pos_embed")  # learned 2D position tables, one row per grid cell


def _resize_grid(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A square raster-order position table (..., n, D) bilinearly resized to (..., m, D)."""
    n, m = table.shape[-2], shape[-2]
    side, new = math.isqrt(n), math.isqrt(m)
    grid = table.reshape(side, side, -1).permute(2, 0, 1)[None].float()  # (1, D, s, s)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)  # (1, D, s', s')
    return grid[0].permute(1, 2, 0).reshape(shape).to(table.dtype)
