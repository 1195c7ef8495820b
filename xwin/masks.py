"""I-JEPA-style multi-block masks for masked image modelling.

For a batch, one target-block size (scale × image area, aspect ratio) and one context-block size are drawn;
then, per image, ``npred`` target blocks are placed at random, and one large context block is placed and
stripped of every target patch (so the encoder never sees what it must predict). Index lists are truncated
to the shortest in the batch so they stack into tensors (I-JEPA does the same; because indices are sorted
in raster order the truncation trims the bottom rows of a block).

Our one simplification of I-JEPA: the ``npred`` target blocks are predicted in one pass of the predictor
(their union is the prediction set), instead of one pass per block. The official X-WIN code uses
``npred = 1``, for which the two are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import XwinError

__all__ = ["BlockMaskConfig", "sample_block_masks"]


@dataclass
class BlockMaskConfig:
    pred_scale: Tuple[float, float] = (0.15, 0.2)
    enc_scale: Tuple[float, float] = (0.85, 1.0)
    aspect_ratio: Tuple[float, float] = (0.75, 1.5)
    npred: int = 1
    min_keep: int = 4
    max_tries: int = 50

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "BlockMaskConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise XwinError(f"unknown mask config keys: {sorted(unknown)}")
        for k in ("pred_scale", "enc_scale", "aspect_ratio"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + float(torch.rand((), generator=g)) * (hi - lo)


def _block_size(grid: int, scale, aspect, g: torch.Generator) -> Tuple[int, int]:
    s = _uniform(scale[0], scale[1], g)
    ar = _uniform(aspect[0], aspect[1], g)
    n = max(1, int(grid * grid * s))
    h = max(1, min(grid, int(round(math.sqrt(n * ar)))))
    w = max(1, min(grid, int(round(math.sqrt(n / ar)))))
    return h, w


def _place(grid: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    top = int(torch.randint(0, grid - h + 1, (), generator=g))
    left = int(torch.randint(0, grid - w + 1, (), generator=g))
    m = torch.zeros(grid, grid, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def sample_block_masks(batch: int, grid: int, cfg: BlockMaskConfig,
                       generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw context and target patch indices for ``batch`` images on a ``grid × grid`` patch grid.

    Returns ``(keep, pred)``: long tensors ``(batch, Kc)`` and ``(batch, Kp)`` of raster indices, sorted,
    disjoint per row, ``Kc >= cfg.min_keep`` and ``Kp >= 1``.
    """
    if batch < 1 or grid < 2:
        raise XwinError(f"need batch >= 1 and grid >= 2, got batch={batch}, grid={grid}")
    if cfg.min_keep >= grid * grid:
        raise XwinError(f"min_keep={cfg.min_keep} leaves nothing to predict on a {grid}x{grid} grid")
    g = generator
    ph, pw = _block_size(grid, cfg.pred_scale, cfg.aspect_ratio, g)
    eh, ew = _block_size(grid, cfg.enc_scale, (1.0, 1.0), g)
    keeps, preds = [], []
    for _ in range(batch):
        for attempt in range(cfg.max_tries):
            pred = torch.zeros(grid, grid, dtype=torch.bool)
            for _ in range(cfg.npred):
                pred |= _place(grid, ph, pw, g)
            ctx = _place(grid, eh, ew, g) & ~pred
            if int(ctx.sum()) >= cfg.min_keep:
                break
        else:  # could not fit: fall back to everything outside the target blocks as context
            ctx = ~pred
            if int(ctx.sum()) < cfg.min_keep:
                raise XwinError("mask configuration leaves fewer than min_keep context patches")
        keeps.append(torch.nonzero(ctx.flatten()).flatten())
        preds.append(torch.nonzero(pred.flatten()).flatten())
    kc = min(len(k) for k in keeps)
    kp = min(len(p) for p in preds)
    return torch.stack([k[:kc] for k in keeps]), torch.stack([p[:kp] for p in preds])
