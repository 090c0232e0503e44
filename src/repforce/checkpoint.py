"""Checkpoints: step folders written atomically, the last k kept, resumed on any number of ranks.

    path = save(run / "checkpoints", step, model, ema, opt, config_json, keep=3, extra={"clock": ...})
    meta = restore(find(run), model, ema, opt)       # --resume: weights, optimizer and RNG back in place
    state, config = read(run)                        # sampling and --init: the EMA weights (and the rest)

A checkpoint is a folder `step_<step:08d>/` holding `config.json`, `model.safetensors` (the
EMA weights alone: sampling needs no pickle) and either
- `state.pt` (one process): model, EMA, optimizer, step, RNG and whatever `extra` holds; or
- `dcp/` + `meta.json` (a sharded run under torchrun): model, EMA and optimizer through
  torch.distributed.checkpoint, sharded and resharded on load, so a run resumes on any
  number of ranks, one included; meta.json holds step, world size, RNG and `extra`.
It is written under a temporary name and renamed into place, so a kill during a save
leaves every earlier checkpoint intact and no half-written folder that looks complete.

Every step folder also holds `checksums.json`: the size and sha256 of each of its files and the id
of the run that wrote it. `verify` checks them, so a truncated or flipped file, a missing shard, a
meta.json or config.json from elsewhere, or a folder from another run is named on load instead of
loaded; `--resume` then falls back to the previous checkpoint (restore_newest). A save that
cannot be written (a full disk, a read-only folder) raises CheckpointError and leaves the earlier
checkpoints as they were; a save never deletes a folder it did not write (one at the same step is
moved aside to `.replaced_step_*`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import runtime
from .pretrained import ASSETS, Weights, clean_name

PREFIX = "step_"
CHECKSUMS = "checksums.json"  # in every step folder: {"run": id, "files": {relative path: {"size", "sha256"}}}


class CheckpointError(Exception):
    """A checkpoint that is missing or cannot be used."""


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit()
            and ((d / "state.pt").exists() or (d / "dcp" / ".metadata").exists())]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def is_sharded(step_dir: Path) -> bool:
    return (Path(step_dir) / "dcp" / ".metadata").exists()


def save(root: Path, step: int, model: nn.Module, ema: nn.Module, opt, config: dict, keep: int = 3,
         extra: dict | None = None) -> Path:
    """The step folder of `step` under root: sharded (DCP) under torchrun with more than one rank, else one
    state.pt. Every rank calls it; rank 0 renames it into place and drops all but the newest `keep`."""
    root = Path(root)
    if runtime.world_size() > 1:
        return _save_sharded(root, step, model, ema, opt, config, keep, extra)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optim": opt.state_dict(), "step": step,
             "rng": torch.get_rng_state(), **(extra or {})}
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        write_checksums(tmp, run_id(root.parent, create=False))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _publish(root, tmp, final, keep)
    except (OSError, RuntimeError) as e:  # ENOSPC, EROFS, EACCES, or torch.save's wrapped write error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {final.name} in {root}: {reason}; the earlier checkpoints "
                              "are untouched") from None
    for stale in root.glob(f".tmp_{PREFIX}*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    if final.exists():  # one that --resume passed over (damaged, or of another run): kept for a person to look at
        os.replace(final, root / f".replaced_{final.name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")
    os.replace(tmp, final)
    for old in step_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _states(model, ema, opt):
    from torch.distributed.checkpoint.state_dict import (  # heavy: sharded only
        get_model_state_dict,
        get_state_dict,
    )

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "ema": get_model_state_dict(ema), "optim": osd}


def _save_sharded(root: Path, step: int, model, ema, opt, config: dict, keep: int, extra: dict | None) -> Path:
    import torch.distributed.checkpoint as dcp  # heavy (~2 s to import): sharded runs only

    final, tmp = root / f"{PREFIX}{step:08d}", root / f".tmp_{PREFIX}{step:08d}"
    if runtime.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    dcp.save(_states(model, ema, opt), checkpoint_id=str(tmp / "dcp"))
    export_ema(ema, tmp / "model.safetensors")
    if runtime.is_main():
        meta = {"step": step, "world_size": runtime.world_size(), "rng": torch.get_rng_state().tolist(),
                **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        write_checksums(tmp, run_id(root.parent, create=False))
        _publish(root, tmp, final, keep)
    runtime.barrier()
    return final


RUN_ID = "run_id"  # in a run folder: the id its checkpoints carry


def run_id(run: Path, create: bool = True) -> str:
    """The id of the run folder `run` (a random hex string in run/run_id, made on first use), "" if it has none
    and `create` is false. A checkpoint's checksums.json carries the id of the run that wrote it."""
    f = Path(run) / RUN_ID
    if create:  # every rank calls it: rank 0 writes, the others wait
        if runtime.is_main() and not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(uuid.uuid4().hex + "\n")
        runtime.barrier()
    return f.read_text().strip() if f.exists() else ""


def write_checksums(step_dir: Path, run: str) -> None:
    """checksums.json of a step folder being written: size and sha256 of every file in it, and the run's id."""
    d = Path(step_dir)
    files = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    (d / CHECKSUMS).write_text(json.dumps({"run": run, "files": files}, indent=1))


def verify(step_dir: Path, run: str | None = None) -> None:
    """CheckpointError naming the first file of a step folder that is missing, of another size or with other bytes
    than at its save, or naming the folder when it was written by a run other than `run` (when given). A folder
    saved before checksums existed has nothing to compare and passes."""
    d = Path(step_dir)
    f = d / CHECKSUMS
    if not f.exists():
        return
    try:
        sums = json.loads(f.read_text())
        files = sums["files"]
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}), so the checkpoint cannot be checked") from None
    if run and sums.get("run") and sums["run"] != run:
        raise CheckpointError(f"{d}: written by another run (id {sums['run'][:8]}, this run's {run[:8]})")
    for name, want in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {CHECKSUMS})")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{p}: {size} bytes, {want['size']} when saved: truncated or replaced")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: its bytes differ from those saved (sha256 mismatch): damaged or replaced")


def restore(step_dir: Path, model: nn.Module, ema: nn.Module, opt) -> dict:
    """Model, EMA, optimizer and RNG from a step folder of either kind, in place; returns the rest of
    its state (step and `extra`). A sharded one loads on any number of ranks; a single-process one
    only in a single process (start a sharded run from it with --init)."""
    step_dir = Path(step_dir)
    if is_sharded(step_dir):
        import torch.distributed.checkpoint as dcp  # heavy (~2 s to import): sharded runs only
        from torch.distributed.checkpoint.state_dict import (  # heavy, likewise
            set_model_state_dict,
            set_state_dict,
        )

        state = _states(model, ema, opt)
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=str(step_dir / "dcp"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        set_model_state_dict(ema, state["ema"])
        meta = json.loads((step_dir / "meta.json").read_text())
        torch.set_rng_state(torch.tensor(meta.pop("rng"), dtype=torch.uint8))
        return meta
    if runtime.world_size() > 1:
        raise CheckpointError(f"{step_dir} is a single-process checkpoint; start a sharded run from it with --init")
    state, _ = read(step_dir)
    model.load_state_dict(state.pop("model"))
    ema.load_state_dict(state.pop("ema"))
    opt.load_state_dict(state.pop("optim"))
    torch.set_rng_state(state.pop("rng"))
    return state


def restore_newest(run: Path, model_cfg: dict, model: nn.Module, ema: nn.Module, opt,
                   model_defaults: dict | None = None) -> tuple[dict | None, list[str]]:
    """--resume: the newest checkpoint of a run folder that passes verify() and holds this model config, restored in
    place; each newer one passed over is named on stderr (and returned). (None, []) when the run has no checkpoint;
    CheckpointError when none can be used. Nothing on disk is changed. `model_defaults` (ModelConfig's defaults as
    config.json holds them) fills a field missing from an older checkpoint's config, so runs saved before a new
    option that keeps the old behaviour stay resumable."""
    dirs = step_dirs(Path(run) / "checkpoints")
    rid, passed_over = run_id(run, create=False), []
    for d in reversed(dirs):
        try:
            verify(d, rid)
            try:
                saved = json.loads((d / "config.json").read_text())["model"]
            except Exception as e:
                raise CheckpointError(f"{d / 'config.json'}: unreadable ({type(e).__name__})") from None
            saved = {**{k: v for k, v in (model_defaults or {}).items() if k not in saved}, **saved}
            if saved != model_cfg:
                diff = sorted(k for k in saved.keys() | model_cfg.keys() if saved.get(k) != model_cfg.get(k))
                raise CheckpointError(f"{d / 'config.json'}: another model config (differs in {', '.join(diff[:4])})")
            state = restore(d, model, ema, opt)
        except CheckpointError as e:
            passed_over.append(str(e))
            if runtime.is_main():
                print(f"repforce: --resume: passing over {d.name}: {e}", file=sys.stderr)
            continue
        if passed_over and runtime.is_main():
            print(f"repforce: --resume: resuming from {d.name}, the newest usable checkpoint", file=sys.stderr)
        return state, passed_over
    if dirs:
        raise CheckpointError(f"no usable checkpoint in {Path(run) / 'checkpoints'} ({len(dirs)} passed over; the "
                              f"newest: {passed_over[0]}); nothing was changed")
    return None, passed_over


def find(path: Path) -> Path:
    """A checkpoint folder from a run folder, a checkpoints folder, a step folder, an exported model
    folder, or the name of a model shipped in the package ("shapes")."""
    path = resolve(path)
    if not path.exists():
        names = ", ".join(shipped()) or "none"
        raise CheckpointError(f"no such checkpoint or run folder: {path} (shipped models: {names})")
    if (path / "state.pt").exists() or (path / "dcp" / ".metadata").exists() or (path / MODEL_META).exists():
        return path
    for root in (path / "checkpoints", path):
        dirs = step_dirs(root)
        if dirs:
            return dirs[-1]
    raise CheckpointError(f"no checkpoint in {path} (expected checkpoints/{PREFIX}NNNNNNNN/state.pt)")


# ----------------------------------------------------------------------------- exported and shipped models

MODEL_META = "model.json"  # beside model.safetensors (fp16 EMA weights), config.json and tokenizer/


def shipped() -> list[str]:
    """Names of the models shipped in the package (assets/<name>/model.json)."""
    return sorted(d.name for d in ASSETS.iterdir() if (d / MODEL_META).exists()) if ASSETS.is_dir() else []


def resolve(path) -> Path:
    """A path as given, or the folder of a shipped model when `path` names one and no such path exists."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (ASSETS / path.name / MODEL_META).exists():
        return ASSETS / path.name
    return path


def export_model(run, out: Path, name: str, version: str, extra: dict | None = None) -> dict:
    """A run's EMA weights as a self-contained model folder (what `repforce.load` and --init read):
    model.safetensors in fp16, config.json, tokenizer/, and model.json with the weights' sha256."""
    d = find(Path(run))
    state, config = read(d)
    tok = next((p / "tokenizer" for p in (d, *d.parents) if (p / "tokenizer").is_dir()), None)
    if tok is None:
        raise CheckpointError(f"no tokenizer/ folder beside the run of {d}")
    out = Path(out)
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {clean_name(k): (v.half() if v.is_floating_point() else v).contiguous() for k, v in state["ema"].items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copytree(tok, tmp / "tokenizer")
    meta = {"name": name, "version": version, "step": int(state.get("step", 0)), "recipe": config.get("recipe", ""),
            "dtype": "float16", "sha256": _sha256(tmp / "model.safetensors"), **(extra or {})}
    (tmp / MODEL_META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_model(d: Path) -> tuple[dict, dict]:
    meta = json.loads((d / MODEL_META).read_text())
    digest = _sha256(d / "model.safetensors")
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{d / 'model.safetensors'}: sha256 {digest[:12]}... does not match {MODEL_META} "
                              f"({str(meta.get('sha256'))[:12]}...): the file is damaged or was replaced")
    w = Weights(d, "model.safetensors")
    state = {k: w[k].float() if w[k].is_floating_point() else w[k] for k in w}
    return {"ema": state, "step": meta.get("step", 0)}, json.loads((d / "config.json").read_text())


def read(path: Path) -> tuple[dict, dict]:
    """(state, config) of the checkpoint at or under `path`, for sampling and --init: a single-process
    checkpoint's whole state, or a sharded one's EMA export under "ema" (read tensor by tensor)."""
    d = find(path)
    if (d / MODEL_META).exists():
        try:
            return _read_model(d)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"unreadable model {d}: {type(e).__name__}: {e}") from None
    verify(d)
    if not (d / "state.pt").exists():  # a sharded checkpoint: its EMA export, read tensor by tensor
        try:
            meta = json.loads((d / "meta.json").read_text())
            return {"ema": Weights(d, "model.safetensors"), "step": meta["step"]}, json.loads(
                (d / "config.json").read_text())
        except Exception as e:
            raise CheckpointError(f"unreadable checkpoint {d}: {type(e).__name__}: {e}") from None
    try:
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)  # tensors and plain values only
        config = json.loads((d / "config.json").read_text())
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointError(f"unreadable checkpoint {d}: {type(e).__name__}: {e}") from None
    return state, config


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def export_ema(ema: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """The EMA weights as one safetensors file, streamed: rank 0 holds one gathered tensor at a time.

    Keys are the plain parameter and persistent-buffer names (wrappers stripped), as RFModel's
    state_dict, so `engine.load` and `--init` read it like a single-process checkpoint."""
    entries = [(clean_name(n), t) for n, t in ema.state_dict().items()]
    header, offset = {}, 0
    for name, t in entries:
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        n = t.numel() * torch.empty(0, dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    f = None
    if runtime.is_main():
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        f = open(path, "wb")
        f.write(struct.pack("<Q", len(text)) + text)
    for name, t in entries:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective for sharded tensors
        if f is not None:
            full = full.detach().to("cpu", dtype if (dtype is not None and full.is_floating_point()) else full.dtype)
            f.write(full.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim buffers too
    if f is not None:
        f.flush()
        os.fsync(f.fileno())
        f.close()
