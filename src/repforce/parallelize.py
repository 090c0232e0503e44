"""Parallelism of a built model: activation checkpointing, torch.compile and FSDP2, each asked for explicitly.

    parallelize(model, device, mixed_bf16, act_ckpt=True, compile=False, shard=world_size() > 1)
    shard_like(ema, device)

FSDP2 shards per transformer block (backbone, encoder, EMA encoder), then the root, with
bf16 parameters and fp32 gradient reduction on GPUs; a sharded model is switched to
uniform mode (`RFModel.set_uniform`) so every rank runs every module. Activation
checkpointing wraps each trained block; its wrapper's name is stripped from checkpoint keys
by the distributed state-dict API and by pretrained.clean_name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import runtime
from .backbone import Attention, Block, SwiGLU


def _blocks(model) -> list[tuple[nn.ModuleList, int, bool]]:
    """(ModuleList, index, is the EMA encoder's) of every transformer block: backbone, encoder, EMA encoder."""
    out = [(model.backbone.layers, i, False) for i in range(len(model.backbone.layers))]
    for enc, is_ema in ((model.encoder, False), (getattr(model, "ema_encoder", None), True)):
        if enc is not None:
            lst = enc.layers()
            out += [(lst, i, is_ema) for i in range(len(lst))]
    return out


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh  # heavy: sharding only

    return init_device_mesh(device.type, (runtime.world_size(),))


def parallelize(model, device: torch.device, mixed_bf16: bool, act_ckpt: bool = False, compile: bool = False,
                shard: bool = True):
    """Activation checkpointing and compile per block, then FSDP2 per block and on the root.

    Activation checkpointing wraps the backbone and encoder blocks (not the EMA encoder, which
    runs without gradients); the wrapper's name is stripped from checkpoint keys by the
    distributed state-dict API and by pretrained.py."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # heavy: only when asked for
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import (  # heavy: only when asked for
        MixedPrecisionPolicy,
        fully_shard,
    )

    for parent, i, is_ema in _blocks(model):
        block = parent[i]
        if act_ckpt and not is_ema:  # frozen blocks too: the gradient of what they feed still passes them
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
    model.set_uniform(True)  # every module runs on every rank, so the collectives line up
    return model


def _compile(block: nn.Module) -> None:
    """torch.compile in place. A backbone block routes a varying number of tokens to each MoT expert
    (a Python-side split), so its attention and dense experts are compiled apart, with dynamic
    shapes; a MoE bank (host-side routing) stays eager. An encoder block is compiled whole."""
    inner = [m for m in block.modules() if isinstance(m, Block)]
    if not inner:
        block.compile()
        return
    for m in inner[0].modules():
        if isinstance(m, (Attention, SwiGLU)):
            m.compile(dynamic=True)


def shard_like(ema, device: torch.device):
    """The EMA copy sharded as the model (Shard(0) on the same mesh), no mixed precision: it never runs forward."""
    from torch.distributed.fsdp import fully_shard  # heavy: only when sharding

    fully_shard(ema, mesh=_mesh(device))
    return ema
