"""Grids: :func:`resample` onto a new grid about the same centre, :func:`crop_or_pad` to a fixed shape."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .volume import Volume

__all__ = ["resample", "crop_or_pad"]


def _interp_axis(x: torch.Tensor, axis: int, pos: torch.Tensor, n_in: int, mode: str, fill: float) -> torch.Tensor:
    """Sample ``x`` along ``axis`` at fractional indices ``pos`` (1D), linear or nearest.

    Positions within half a voxel of the outer voxel centres take the edge value (the voxel fills its
    cell); positions beyond the cell edges (index < -1/2 or > n - 1/2) take ``fill``.
    """
    outside = (pos < -0.5 - 1e-6) | (pos > n_in - 0.5 + 1e-6)
    p = pos.clamp(0, n_in - 1)
    if mode == "nearest":
        idx = torch.floor(p + 0.5).long().clamp(0, n_in - 1)
        out = torch.index_select(x, axis, idx)
    else:
        i0 = torch.floor(p).long().clamp(0, max(n_in - 2, 0))
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (p - i0.to(p.dtype)).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = -1
        w = w.view(shape)
        out = torch.index_select(x, axis, i0) * (1 - w) + torch.index_select(x, axis, i1) * w
    if outside.any():
        shape = [1] * x.dim()
        shape[axis] = -1
        out = torch.where(outside.view(shape), torch.as_tensor(fill, dtype=out.dtype, device=out.device), out)
    return out


def resample(
    volume: Volume,
    spacing=None,
    shape=None,
    *,
    mode: Optional[str] = None,
    fill: float = -1000.0,
) -> Volume:
    """Resample ``volume`` onto a new grid with the same axes directions and the same world centre.

    * ``spacing`` only: new spacing (mm, scalar or 3), shape = round(old extent / new spacing).
    * ``shape`` only: new shape, spacing = old extent / new shape (extent = shape * spacing is kept).
    * both: exactly that grid, centred where the old one was (regions outside the old grid get ``fill``).

    ``mode``: "trilinear" (default for float data) or "nearest" (default for integer label maps).
    Trilinear is separable 1D linear interpolation along each axis (the exact tensor-product trilinear
    interpolant of the voxel centres). No anti-alias prefilter: downsample by large factors with care.
    """
    if spacing is None and shape is None:
        raise ValueError("resample: give spacing, shape or both")
    old_shape = np.asarray(volume.spatial_shape, dtype=np.int64)
    old_sp = volume.spacing
    if spacing is not None:
        new_sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        if np.any(new_sp <= 0):
            raise ValueError(f"resample: spacing must be positive, got {new_sp}")
    if shape is not None:
        new_shape = np.broadcast_to(np.asarray(shape, dtype=np.int64), (3,)).copy()
        if np.any(new_shape < 1):
            raise ValueError(f"resample: shape must be positive, got {new_shape}")
    if spacing is None:
        new_sp = old_shape * old_sp / new_shape
    if shape is None:
        new_shape = np.maximum(1, np.round(old_shape * old_sp / new_sp)).astype(np.int64)
    if mode is None:
        mode = "trilinear" if (volume.data.is_floating_point() or volume.data.is_complex()) else "nearest"
    if mode not in ("trilinear", "linear", "nearest"):
        raise ValueError(f"resample: mode must be 'trilinear' or 'nearest', got {mode!r}")

    scale = new_sp / old_sp  # old index step per new index step
    offset = (old_shape - 1) / 2.0 - scale * (new_shape - 1) / 2.0
    x = volume.data
    orig_dtype = x.dtype
    if mode != "nearest" and not x.is_floating_point():
        x = x.float()
    nd = x.dim()
    for d in range(3):
        pos = torch.arange(int(new_shape[d]), dtype=torch.float64, device=x.device) * float(scale[d]) + float(offset[d])
        x = _interp_axis(x, nd - 3 + d, pos, int(old_shape[d]), "nearest" if mode == "nearest" else "linear", fill)
    if mode == "nearest":
        x = x.to(orig_dtype)

    new_aff = volume.affine.copy()
    new_aff[:3, :3] = volume.affine[:3, :3] * (new_sp / old_sp)[None, :]
    new_aff[:3, 3] = volume.center_world - new_aff[:3, :3] @ ((new_shape - 1) / 2.0)
    return Volume(x.contiguous(), new_aff)


def crop_or_pad(volume: Volume, shape, fill: float = -1000.0, center=None, threshold: float = -500.0) -> Volume:
    """Crop and/or pad ``volume`` to ``shape`` about a centre, keeping voxel size and world positions.

    ``center``: voxel index (i, j, k) (floats allowed) to put at the middle of the output; default the
    centroid of voxels above ``threshold`` (HU, -500: the body), or the volume centre if none is.
    New voxels get ``fill``. The affine is shifted so every kept voxel keeps its world position.
    """
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(shape), (3,)))
    if any(s < 1 for s in shape):
        raise ValueError(f"crop_or_pad: shape must be positive, got {shape}")
    old = volume.spatial_shape
    x = volume.data
    if center is None:
        body = x > threshold
        if x.dim() == 4:
            body = body.any(0)
        idx = torch.nonzero(body)
        if idx.numel() == 0:
            center = (np.asarray(old, dtype=np.float64) - 1) / 2
        else:
            center = idx.double().mean(0).cpu().numpy()
    center = np.asarray(center, dtype=np.float64)
    start = np.round(center - (np.asarray(shape) - 1) / 2.0).astype(np.int64)

    out = torch.full(x.shape[:-3] + shape, fill, dtype=x.dtype, device=x.device)
    src, dst = [], []
    for d in range(3):
        s0 = max(0, int(start[d]))
        s1 = min(old[d], int(start[d]) + shape[d])
        if s1 <= s0:
            src = None
            break
        src.append(slice(s0, s1))
        dst.append(slice(s0 - int(start[d]), s1 - int(start[d])))
    if src is not None:
        out[(..., *dst)] = x[(..., *src)]
    aff = volume.affine.copy()
    aff[:3, 3] = volume.affine[:3, :3] @ start.astype(np.float64) + volume.affine[:3, 3]
    return Volume(out, aff)
