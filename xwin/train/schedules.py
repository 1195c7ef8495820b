"""Optimiser schedules (pure functions of the step) and the AdamW parameter groups."""

from __future__ import annotations

import math
from typing import Mapping, Union

import torch

from .config import OptimConfig, section

__all__ = ["lr_at", "wd_at", "momentum_at", "param_groups"]

Optim = Union[OptimConfig, Mapping]


def lr_at(step: int, total: int, o: Optim, peak: float) -> float:
    """Linear warm-up start_lr -> peak over ``warmup_steps``, then cosine decay peak -> final_lr.

    The warm-up never decreases the lr: when the batch-scaled peak is below ``start_lr`` (e.g. the
    official 1e-4 × 24/256 = 9.4e-6 < 2e-5 on one GPU), it starts at the peak (a constant warm-up).
    """
    o = section(o)
    w = int(o["warmup_steps"])
    if step < w:
        start = min(o["start_lr"], peak)
        return start + (peak - start) * step / max(1, w)
    t = (step - w) / max(1, total - w)
    return o["final_lr"] + (peak - o["final_lr"]) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def wd_at(step: int, total: int, o: Optim) -> float:
    """Cosine weight-decay schedule from ``wd`` (0.004) at step 0 to ``final_wd`` (0.04) at the end."""
    o = section(o)
    t = min(1.0, step / max(1, total))
    return o["final_wd"] + (o["wd"] - o["final_wd"]) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_at(step: int, total: int, o: Optim) -> float:
    """EMA momentum rising linearly from ema[0] (0.996) to ema[1] (1.0) over training."""
    m0, m1 = section(o)["ema"]
    return m0 + (m1 - m0) * min(1.0, step / max(1, total))


def param_groups(model: torch.nn.Module):
    """Two AdamW groups: weights (decayed, ``apply_wd``) and biases/norms (never decayed)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
