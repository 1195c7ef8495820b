"""Public projector API: ``project`` (differentiable) and its exact adjoint ``backproject``."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from xwin.geometry import Geometry

from . import reference
from ._prep import (ProjectorInputError, affine_batch, check_geometry, check_method, check_volume,
                    min_spacing, output_dtype, ray_params)

__all__ = ["project", "backproject", "triton_available", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ProjectorInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise ProjectorInputError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing triton); "
            f"data is on {device}")
    return backend


def _impl(backend: str):
    if backend == "torch":
        return reference
    from . import _triton
    return _triton


class _Setup:
    """Everything both directions need, computed once per call."""

    def __init__(self, geometry, affine, batch, shape, method, step, backend, device):
        self.method, self.step = check_method(method, step)
        self.geometry = check_geometry(geometry, device)
        self.affine = affine_batch(affine, batch)
        self.params = ray_params(self.geometry, self.affine)                      # (B, V, 24) float64 CPU
        self.dt_mm = (self.step * min_spacing(self.affine)).tolist()              # per batch entry, mm
        self.shape = tuple(int(s) for s in shape)
        self.backend = resolve_backend(backend, device)
        self.impl = _impl(self.backend)

    def forward(self, vol4):
        g = self.geometry
        return self.impl.forward(vol4, self.params, g.kind, g.rows, g.cols, self.method,
                                 torch.tensor(self.dt_mm, dtype=torch.float64))

    def adjoint(self, proj4, out_dtype):
        return self.impl.adjoint(proj4, self.params, self.geometry.kind, self.shape, self.method,
                                 torch.tensor(self.dt_mm, dtype=torch.float64), out_dtype)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vol4, setup):
        ctx.setup = setup
        ctx.vol_dtype = vol4.dtype
        return setup.forward(vol4.detach())

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _Backproject.apply(grad.contiguous(), ctx.setup, ctx.vol_dtype), None


class _Backproject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj4, setup, out_dtype):
        ctx.setup = setup
        ctx.proj_dtype = proj4.dtype
        return setup.adjoint(proj4.detach(), out_dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _Project.apply(grad.contiguous(), ctx.setup).to(ctx.proj_dtype), None, None


def project(volume: torch.Tensor, geometry: Geometry, *, affine=None, method: str = "siddon",
            step: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Line integrals of ``volume`` along the rays of ``geometry``.

    Args:
        volume: (X, Y, Z) or (B, X, Y, Z) tensor, indexed like ``nibabel.load(f).get_fdata()``;
            float32/float64, or float16/bfloat16 storage (accumulated in float32).
        geometry: an :class:`xwin.geometry.Geometry` (cone or parallel beam, V views).
        affine: voxel index → world mm, (4, 4) shared by the batch or (B, 4, 4); default identity.
        method: ``"siddon"`` (exact integral of the nearest-voxel volume) or ``"trilinear"``
            (midpoint-rule integral of the zero-padded trilinear interpolant).
        step: trilinear sample step in units of the smallest voxel spacing.
        backend: ``"auto"`` (Triton for CUDA tensors, torch reference otherwise), ``"triton"``, ``"torch"``.

    Returns:
        (V, rows, cols) or (B, V, rows, cols) line integrals ∫ volume dl with dl in mm, float32
        (float64 for a float64 volume). Differentiable with respect to ``volume``; the gradient is
        :func:`backproject`, the exact adjoint.
    """
    vol4, squeeze = check_volume(volume)
    setup = _Setup(geometry, affine, vol4.shape[0], vol4.shape[1:], method, step, backend, vol4.device)
    out = _Project.apply(vol4.contiguous(), setup)
    return out[0] if squeeze else out


def backproject(projections: torch.Tensor, geometry: Geometry, volume_shape: Sequence[int], *, affine=None,
                method: str = "siddon", step: float = 0.5, backend: str = "auto",
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The exact adjoint (transpose) of :func:`project`.

    Args:
        projections: (V, rows, cols) or (B, V, rows, cols), matching ``geometry``.
        volume_shape: (X, Y, Z) of the volume to fill.
        dtype: output dtype (default: float64 for float64 projections, else float32).

    Returns:
        (X, Y, Z) or (B, X, Y, Z): for every voxel, the sum over rays of (ray weight of that voxel ×
        projection value), so that ⟨project(x), y⟩ = ⟨x, backproject(y)⟩.
    """
    if not isinstance(projections, torch.Tensor):
        raise ProjectorInputError(f"projections must be a torch.Tensor, got {type(projections).__name__}")
    if projections.ndim not in (3, 4):
        raise ProjectorInputError(
            f"projections must have shape (V, rows, cols) or (B, V, rows, cols), got {tuple(projections.shape)}")
    if projections.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ProjectorInputError(f"projections must be floating point, got {projections.dtype}")
    squeeze = projections.ndim == 3
    p4 = projections.unsqueeze(0) if squeeze else projections
    if not isinstance(geometry, Geometry):
        raise ProjectorInputError(f"geometry must be an xwin.geometry.Geometry, got {type(geometry).__name__}")
    want = (geometry.num_views, geometry.rows, geometry.cols)
    if tuple(p4.shape[1:]) != want:
        raise ProjectorInputError(f"projections have shape {tuple(p4.shape[1:])} per batch entry but the "
                                  f"geometry describes (views, rows, cols) = {want}")
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ProjectorInputError(f"volume_shape must be three positive sizes (X, Y, Z), got {tuple(volume_shape)}")
    if dtype is None:
        dtype = output_dtype(p4.dtype)
    setup = _Setup(geometry, affine, p4.shape[0], shape, method, step, backend, p4.device)
    out = _Backproject.apply(p4.contiguous(), setup, dtype)
    return out[0] if squeeze else out
