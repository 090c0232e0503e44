"""The process: torchrun's process group, rank and world size, collectives, and numeric precision.

    rt = setup("cpu")                  # joins torchrun's group when its env is set; else one process
    with autocast(precision, rt.device): ...

Every other module asks this one for rank and world size. Without torchrun's env (RANK,
WORLD_SIZE, LOCAL_RANK) it is one process and every collective is the identity. Under
torchrun: one process group, NCCL on GPUs and gloo on CPUs. A leaf: it imports nothing of
the package.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
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
    if is_initialized():  # a sharded tensor exists only in a process group
        from torch.distributed.tensor import (  # heavy (~1 s): sharded runs only
            DTensor,
            distribute_tensor,
        )
    if is_initialized() and isinstance(dst, DTensor):
        src = src.to(device=dst.device_mesh.device_type, dtype=dst.dtype)
        src = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)
    else:
        src = src.to(device=dst.device, dtype=dst.dtype)
    dst.copy_(src)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clip over sharded or plain parameters; returns the norm as a plain tensor."""
    norm = nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def main_file(path: Path):
    """path opened for appending on rank 0; a sink elsewhere."""
    return open(path, "a") if is_main() else open(os.devnull, "w")


# ----------------------------------------------------------------------------- precision

_BF16_MATMUL_FAST: dict[str, bool] = {}


def bf16_matmuls_fast() -> bool:
    """Whether bf16 matmuls run natively on this CPU (within 2x of fp32), timed once per process.

    On AVX2-only CPUs bf16 is emulated and about 100x slower than fp32; with AVX512-BF16 or
    AMX it is up to about 2x faster. Necessary for bf16 to pay, not sufficient (see choose_precision)."""
    if "cpu" not in _BF16_MATMUL_FAST:
        def seconds(dtype):  # best of three: one timing of a sub-millisecond product is mostly noise
            a = torch.randn(512, 512, dtype=dtype)
            a @ a
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                a @ a
                best = min(best, time.perf_counter() - t0)
            return best

        # emulation is ~100x slower, native ~0.5x: the 2x margin keeps timing noise from calling a native CPU
        # emulated (a single 256-wide timing did so on an AVX512-BF16 host); the timed step then decides
        _BF16_MATMUL_FAST["cpu"] = seconds(torch.bfloat16) < 2 * seconds(torch.float32)
    return _BF16_MATMUL_FAST["cpu"]


def choose_precision(precision: str, device: torch.device, work=None, repeats: int = 2) -> tuple[str, str]:
    """(precision, why) for a run: "bf16" or "fp32".

    An explicit "bf16" or "fp32" is kept. "auto" is bf16 on accelerators; on a CPU it is fp32
    where bf16 matmuls are emulated, and elsewhere the faster of the two for `work` (a callable
    doing one unit of the real work, e.g. a training step of the model at hand, run under each
    autocast: warmed once, then timed `repeats` times), since a fast bf16 matmul does not make a
    small model's step faster. Without `work`, bf16 wherever its matmuls are fast. Under
    torchrun every rank takes bf16 only if every rank found it faster."""
    if precision != "auto":
        return precision, "set by train.precision"
    if device.type != "cpu":
        return "bf16", f"auto: {device.type} device"
    fast = all_sum(torch.tensor([float(bf16_matmuls_fast())], device=device)).item() == world_size()
    if not fast:
        return "fp32", "auto: bf16 matmuls are emulated on this CPU"
    if work is None:
        return "bf16", "auto: bf16 matmuls are fast on this CPU"
    seconds = {}
    for p in ("fp32", "bf16"):
        with autocast(p, device):
            work()
            t0 = time.perf_counter()
            for _ in range(repeats):
                work()
        seconds[p] = (time.perf_counter() - t0) / repeats
    votes = all_sum(torch.tensor([float(seconds["bf16"] < seconds["fp32"])], device=device))
    pick = "bf16" if votes.item() == world_size() else "fp32"
    return pick, f"auto: a timed step took {seconds['fp32']:.3g} s in fp32, {seconds['bf16']:.3g} s in bf16"


def autocast(precision: str, device: torch.device):
    """bf16 autocast for "bf16", nothing for "fp32" (resolve "auto" with choose_precision first)."""
    if precision == "auto":
        precision = choose_precision(precision, device)[0]
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
