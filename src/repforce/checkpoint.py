"""Step-folder checkpoints: written atomically, the last k kept, the newest found on resume.

    save(run / "checkpoints", step, state, config_json, keep=3)
    step, state = load_latest(run / "checkpoints")

A checkpoint is a folder `step_<step:08d>/` holding `state.pt` (model, EMA, optimizer,
schedule, data position, RNG states: whatever the trainer puts in `state`), `model.safetensors`
(the EMA weights alone, for sampling without torch.load of a pickle) and `config.json`.
It is written under a temporary name and renamed into place, so a kill during a save
leaves every earlier checkpoint intact and no half-written folder that looks complete.

A sharded run (torchrun, distributed.py) writes `dcp/` (torch.distributed.checkpoint) and
`meta.json` instead of `state.pt`; `load` then gives the EMA weights of its
`model.safetensors`, read lazily, under "ema" (enough for sampling and for --init).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "step_"


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


def save(root: Path, step: int, state: dict, config: dict, weights: dict[str, torch.Tensor] | None = None,
         keep: int = 3) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    if weights is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in step_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp_{PREFIX}*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve(path: Path) -> Path:
    """A checkpoint folder from a run folder, a checkpoints folder or a step folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run folder: {path}")
    if (path / "state.pt").exists() or (path / "dcp" / ".metadata").exists():
        return path
    for root in (path / "checkpoints", path):
        dirs = step_dirs(root)
        if dirs:
            return dirs[-1]
    raise CheckpointError(f"no checkpoint in {path} (expected checkpoints/{PREFIX}NNNNNNNN/state.pt)")


def load(path: Path) -> tuple[dict, dict]:
    """(state, config) of the checkpoint at or under `path`."""
    d = resolve(path)
    if not (d / "state.pt").exists():  # a sharded checkpoint: its EMA export, read tensor by tensor
        from .pretrained import Weights

        try:
            meta = json.loads((d / "meta.json").read_text())
            return {"ema": Weights(d, "model.safetensors"), "step": meta["step"]}, json.loads(
                (d / "config.json").read_text())
        except Exception as e:
            raise CheckpointError(f"unreadable checkpoint {d}: {type(e).__name__}: {e}") from None
    try:
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        config = json.loads((d / "config.json").read_text())
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointError(f"unreadable checkpoint {d}: {type(e).__name__}: {e}") from None
    return state, config
