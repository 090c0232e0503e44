"""Data parallelism for the one trainer: torchrun's env, FSDP2, sharded checkpoints, EMA export.

    torchrun --nproc_per_node 8 -m repforce.cli train --preset scale_small_s2 --out runs/s2
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \\
        -m repforce.cli train --preset scale_s2 --out runs/s2

Every other module asks this one for rank and world size. Without torchrun's env
(RANK, WORLD_SIZE, LOCAL_RANK) it is one process and every collective is the identity.
Under torchrun: one process group (NCCL on GPUs, gloo on CPUs); the model is sharded
with FSDP2 (`fully_shard` per transformer block of the backbone and of the encoder,
then the root), bf16 parameters with fp32 gradient reduction on GPUs, activation
checkpointing per block and torch.compile per block as options. Each rank trains on
its slice of the global batch (`local_batch`); losses are normalized by item counts over
all ranks, and flow noise is drawn per sample, so N ranks compute the same update as
one process on the same global batch.

Checkpoints (`save`, `load`): a step folder holding `dcp/` (torch.distributed.checkpoint:
model, EMA, optimizer, sharded and resharded on load, so a run resumes on any number of
ranks, one included), `meta.json` (step, world size, RNG) and `model.safetensors` (the
EMA weights as one file, written by rank 0 one tensor at a time).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

# ----------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "cpu") -> Runtime:
    """Join torchrun's process group if its env is set (idempotent); pick this rank's device.

    device "cuda" under torchrun means cuda:LOCAL_RANK; "auto" is cuda when available."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return Runtime(rank(), world_size(), local, dev)


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of t over ranks (a new tensor); t itself when there is one process."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (so all ranks stop at the same step)."""
    if world_size() == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars averaged over the ranks that have them (for logging; a rank may lack e.g. rep_acc)."""
    keys = sorted(values)
    if world_size() > 1:
        every: list = [None] * world_size()
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
    if not keys:
        return {}
    dev = next(iter(values.values())).device if values else torch.device("cpu")
    v = torch.stack([values[k].detach().float().reshape(()).to(dev) if k in values else torch.zeros((), device=dev)
                     for k in keys])
    have = torch.tensor([float(k in values) for k in keys], device=dev)
    v, have = all_sum(torch.stack([v, have]))
    return dict(zip(keys, (v / have.clamp(min=1)).tolist()))


def first_nonempty_rows(z: torch.Tensor, n: int) -> torch.Tensor:
    """n random rows of z from the lowest rank that has any: the same (n, D) on every rank."""
    D = z.shape[1]
    pick = z[torch.randint(z.shape[0], (n,), device=z.device)] if z.shape[0] else z.new_zeros(n, D)
    rows = [torch.empty_like(pick) for _ in range(world_size())]
    has = [torch.empty(1, device=z.device) for _ in range(world_size())]
    dist.all_gather(rows, pick.contiguous())
    dist.all_gather(has, torch.tensor([float(z.shape[0] > 0)], device=z.device))
    first = next((r for r, h in zip(rows, has) if h.item() > 0), rows[0])
    return first


@torch.no_grad()
def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, where src is the full tensor and dst a plain or FSDP-sharded (DTensor) one.

    A rank keeps only its own shard: the split is local, no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(dst, DTensor):
        src = src.to(device=dst.device_mesh.device_type, dtype=dst.dtype)
        src = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)
    else:
        src = src.to(device=dst.device, dtype=dst.dtype)
    dst.copy_(src)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clip over sharded or plain parameters; returns the norm as a plain tensor."""
    norm = nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ----------------------------------------------------------------------------- batches


def local_batch(stream, step: int, global_batch: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's slice of the global batch of `step`, with per-sample noise seeds and the loss divisors.

    Sample j of the run (j = step * global_batch + i) always gets noise seed f(seed, j), so the
    flow noise does not depend on how the batch is split. norm_lm / norm_rep / norm_gen are the
    global counts of text targets, rep predictions and generation samples divided by the world
    size: RFModel divides its loss sums by them (see rf.py), and FSDP's gradient average over
    ranks then equals the gradient of the global mean.
    """
    from .rf import REP

    r, w = rank(), world_size()
    if global_batch % w:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {w} ranks")
    b = global_batch // w
    first = step * global_batch + r * b  # index of this rank's first sample in the run
    batch = stream.batch(step, global_batch, r, w)  # samples first .. first + b - 1 of the run
    batch["noise_seed"] = (seed * 1_000_003 + first + torch.arange(b, dtype=torch.long)) % (2**62)
    keep = batch["is_gen"] & ~batch["drop_rep"]
    counts = torch.tensor([(batch["text_targets"] != -100).sum(), ((batch["kind"] == REP) & keep[:, None]).sum(),
                           batch["is_gen"].sum()], dtype=torch.float32, device=device)
    counts = all_sum(counts) / w
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["norm_lm"], batch["norm_rep"], batch["norm_gen"] = counts[0], counts[1], counts[2]
    return batch


# ----------------------------------------------------------------------------- the model


def main_file(path: Path):
    """path opened for appending on rank 0; a sink elsewhere."""
    return open(path, "a") if is_main() else open(os.devnull, "w")


def _blocks(model) -> list[tuple[nn.ModuleList, int, bool]]:
    """(ModuleList, index, is the EMA encoder's) of every transformer block: backbone, encoder, EMA encoder."""
    out = [(model.backbone.layers, i, False) for i in range(len(model.backbone.layers))]
    for enc, is_ema in ((model.encoder, False), (getattr(model, "ema_encoder", None), True)):
        if enc is not None:
            lst = enc.layers() if hasattr(enc, "layers") else enc.blocks
            out += [(lst, i, is_ema) for i in range(len(lst))]
    return out


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size(),))


def parallelize(model, device: torch.device, mixed_bf16: bool, act_ckpt: bool = False, compile: bool = False,
                shard: bool = True):
    """Activation checkpointing and compile per block, then FSDP2 per block and on the root.

    Activation checkpointing wraps the backbone and encoder blocks (not the EMA encoder, which
    runs without gradients); the wrapper's name is stripped from checkpoint keys by the
    distributed state-dict API and by pretrained.py."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for parent, i, is_ema in _blocks(model):
        block = parent[i]
        if act_ckpt and not is_ema:  # frozen blocks too: the gradient of what they feed still passes them
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if compile:
            _compile(block)
        parent[i] = block
    if not shard:
        return model
    mesh = _mesh(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for parent, i, _ in _blocks(model):
        fully_shard(parent[i], **kw)
    fully_shard(model, **kw)
    model.uniform = True  # every module runs on every rank, so the collectives line up (rf.py, model.py)
    for m in model.modules():
        if hasattr(m, "uniform"):
            m.uniform = True
    return model


def _compile(block: nn.Module) -> None:
    """torch.compile in place. A backbone block routes a varying number of tokens to each MoT expert
    (a Python-side split), so its attention and dense experts are compiled apart, with dynamic
    shapes; a MoE bank (host-side routing) stays eager. An encoder block is compiled whole."""
    from .model import Attention, Block, SwiGLU

    inner = [m for m in block.modules() if isinstance(m, Block)]
    if not inner:
        block.compile()
        return
    for m in inner[0].modules():
        if isinstance(m, (Attention, SwiGLU)):
            m.compile(dynamic=True)


def shard_like(ema, device: torch.device):
    """The EMA copy sharded as the model (Shard(0) on the same mesh), no mixed precision: it never runs forward."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(ema, mesh=_mesh(device))
    return ema


def build(cfg, device: torch.device, init_fn=None, fresh: bool = True):
    """The trained model, its EMA and the init report, for one process or a sharded run.

    Small models are built whole on every rank with the same seed, so a sharded run starts
    from exactly the weights of a single-process one. With cfg.train.meta_init (the scale
    presets) the model is built on the meta device, sharded, materialized and initialized
    shard by shard: no rank ever holds all of it. Then pretrained weights (train.llm,
    train.vision; only for a fresh run without init_fn) or init_fn (a previous stage) are
    copied in, shard by shard too, and the EMA starts equal to the result.
    train.train_only freezes every parameter outside its name prefixes (stage 1)."""
    import copy

    from . import pretrained
    from .rf import RFModel

    t = cfg.train
    sharded = world_size() > 1
    if t.meta_init:
        with torch.device("meta"):
            model = RFModel(cfg.model)
            ema = RFModel(cfg.model)
    else:
        model = RFModel(cfg.model)
        ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    if t.train_only:
        keep = tuple(p.strip() for p in t.train_only.split(",") if p.strip())
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
    if sharded or t.act_ckpt or t.compile:
        mixed = device.type == "cuda" and t.precision != "fp32"
        parallelize(model, device, mixed, t.act_ckpt, t.compile, shard=sharded)
    if sharded:
        shard_like(ema, device)
    if t.meta_init:
        for m in (model, ema):
            m.to_empty(device=device)
            m.init_weights()
    else:
        model.to(device)
        ema.to(device)
    report = None
    if (t.llm or t.vision) and fresh and init_fn is None:
        report = pretrained.load(model, t.llm or None, t.vision or None)
    if init_fn is not None:
        report = init_fn(model)
    copy_weights_(ema, model)
    return model, ema, report


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers <- src's, in registration order (names may differ by wrappers)."""
    for a, b in zip(dst.parameters(), src.parameters()):
        a.copy_(b.detach())
    for a, b in zip(dst.buffers(), src.buffers()):
        a.copy_(b)


# ----------------------------------------------------------------------------- checkpoints


def is_dcp(step_dir: Path) -> bool:
    return (Path(step_dir) / "dcp" / ".metadata").exists()


def _states(model, ema, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "ema": get_model_state_dict(ema), "optim": osd}


def save(root: Path, step: int, model, ema, opt, config: dict, keep: int = 3, extra: dict | None = None) -> Path:
    """A sharded step folder, written under a temporary name and renamed into place by rank 0."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_states(model, ema, opt), checkpoint_id=str(tmp / "dcp"))
    export_ema(ema, tmp / "model.safetensors")
    if is_main():
        meta = {"step": step, "world_size": world_size(), "rng": torch.get_rng_state().tolist(), **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        from .checkpoint import step_dirs

        for old in step_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(step_dir: Path, model, ema, opt) -> dict:
    """Restore model, EMA and optimizer from a sharded step folder (any world size); returns meta.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    import warnings

    step_dir = Path(step_dir)
    state = _states(model, ema, opt)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(step_dir / "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema, state["ema"])
    meta = json.loads((step_dir / "meta.json").read_text())
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def export_ema(ema: nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """The EMA weights as one safetensors file, streamed: rank 0 holds one gathered tensor at a time.

    Keys are the plain parameter and persistent-buffer names (wrappers stripped), as RFModel's
    state_dict, so `engine.load` and `--init` read it like a single-process checkpoint."""
    from .pretrained import _clean

    entries = [(_clean(n), t) for n, t in ema.state_dict().items()]
    header, offset = {}, 0
    for name, t in entries:
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        n = t.numel() * torch.empty(0, dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    f = None
    if is_main():
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
