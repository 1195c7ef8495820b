"""torchrun / DDP plumbing: process-group set-up, the device of this rank, replica checks."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["dist_setup", "is_dist", "replica_divergence", "all_gather_objects", "mean_across_ranks"]


def dist_setup(device_arg: Optional[str]):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) initialises the process group: NCCL on CUDA,
    gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device_arg) if device_arg else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (a one-element list when not distributed)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(vals: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(vals)
        vals /= dist.get_world_size()
    return vals


@torch.no_grad()
def replica_divergence(modules: Sequence[torch.nn.Module]) -> float:
    """Max |θ_rank − θ_rank0| over all parameters and ranks (0.0 when not distributed)."""
    if not is_dist():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for m in modules for p in m.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    d = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return float(d.item())
