"""Input checks and per-view ray parameters shared by the torch reference and the Triton kernels.

Rays are described in *index space* (voxel (i, j, k) centre at integer coordinates) with the ray parameter
``t`` in world millimetres, so segment lengths come out in mm whatever the affine:

* cone beam: ``q(t) = S + t · d / |M d|`` with ``d = P − S`` (index-space source S, pixel P) and
  ``t ∈ [0, |M d|]``; ``M`` is the affine's 3×3 part, so ``|M d|`` is the world length source→pixel;
* parallel beam: ``q(t) = P + t · E`` with ``E = M⁻¹ · direction/|direction|``, ``t ∈ (−∞, ∞)``.

Per (batch b, view n) we pack 24 float64 numbers, laid out as :mod:`xwin.kernels.layout` names them:
``[S or E (3), C (3), U (3), V (3), M (9), 0, 0, 0]``, where ``C, U, V`` are the detector centre and steps
mapped to index space. :func:`ray_params` is plain torch arithmetic on the geometry's tensors and the
affine, so the record is differentiable with respect to both (the geometry-gradient path relies on it).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from xwin.errors import XwinError
from xwin.geometry import Geometry

from .layout import RAY_CENTER, RAY_FIRST, RAY_M, RAY_RECORD, RAY_U, RAY_V

__all__ = ["ProjectorInputError", "check_volume", "check_method", "check_shape", "affine_batch", "ray_params",
           "as_batched", "check_finite_default", "NPARAM", "FLOATS"]

NPARAM = RAY_RECORD
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
METHODS = ("siddon", "trilinear")
#: environment switch for the default of ``check_finite`` (``XWIN_CHECK_FINITE=0`` turns the check off)
CHECK_FINITE_ENV = "XWIN_CHECK_FINITE"


class ProjectorInputError(XwinError):
    """Bad input to project/backproject: wrong rank, dtype, device, empty volume, NaN/Inf values, ..."""


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_finite_default(check_finite: Optional[bool]) -> bool:
    """``check_finite`` as given, or the default: on, unless the environment sets ``XWIN_CHECK_FINITE=0``."""
    if check_finite is not None:
        return bool(check_finite)
    return os.environ.get(CHECK_FINITE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def check_method(method: str, step: float) -> Tuple[str, float]:
    if method not in METHODS:
        raise ProjectorInputError(f"method must be one of {METHODS}, got {method!r}")
    step = float(step)
    if method == "trilinear" and not (math.isfinite(step) and step > 0):
        raise ProjectorInputError(f"trilinear step must be a positive finite number (in voxels), got {step}")
    return method, step


def as_batched(x, name: str, layout: str, dtypes=FLOATS, error=ProjectorInputError) -> Tuple[torch.Tensor, bool]:
    """The one shape/dtype check for stacks of volumes or projections: ``x`` is a 3-D ``layout`` or a 4-D
    batch of them; returns it as 4-D and whether the batch axis was added. ``error`` is the class raised."""
    if not isinstance(x, torch.Tensor):
        raise error(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise error(f"{name} must have shape {layout} or (B, {layout[1:]}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise error(f"{name} is empty: shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise error(f"{name} must be {names}, got {x.dtype}")
    squeeze = x.ndim == 3
    return (x.unsqueeze(0) if squeeze else x), squeeze


def check_volume(volume, name: str = "volume") -> Tuple[torch.Tensor, bool]:
    """Return the volume as (B, X, Y, Z) and whether the batch axis was added."""
    return as_batched(volume, name, "(X, Y, Z)")


def check_shape(volume_shape: Sequence[int], error=ProjectorInputError) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in volume_shape)
    except Exception:
        raise error(f"volume_shape must be three positive sizes (X, Y, Z), got {volume_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise error(f"volume_shape must be three positive sizes (X, Y, Z), got {tuple(volume_shape)}")
    return shape


def check_geometry(geometry, device: Optional[torch.device] = None) -> Geometry:
    if not isinstance(geometry, Geometry):
        raise ProjectorInputError(f"geometry must be an xwin.geometry.Geometry, got {type(geometry).__name__}")
    gdev = geometry.device
    if device is not None and gdev.type != "cpu" and gdev != device:
        raise ProjectorInputError(f"geometry lives on {gdev} but the data on {device}; move one with .to()")
    return geometry


def check_all_finite(x: torch.Tensor, what: str) -> None:
    """Raise ProjectorInputError naming ``what`` when an element of ``x`` is NaN or Inf.

    One reduction in the common case: a finite sum proves every element finite (a NaN or an Inf anywhere
    makes the sum NaN or Inf); only a non-finite sum (bad input, or finite values overflowing the sum)
    runs the element-wise test."""
    if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
        return
    raise ProjectorInputError(
        f"{what} contains NaN or Inf (pass check_finite=False or set {CHECK_FINITE_ENV}=0 to skip this check)")


def affine_batch(affine, batch: Optional[int] = None) -> torch.Tensor:
    """(B, 4, 4) float64 CPU tensor from None, a (4, 4) or a (B, 4, 4) array or tensor.

    ``batch=None``: a single affine comes back as (1, 4, 4) (it is broadcast over the volumes at call
    time). A tensor keeps its autograd history (geometry gradients flow to the affine); value checks
    (finite, last row, singular) are skipped while ``torch.compile`` traces.
    """
    if affine is None:
        eye = torch.eye(4, dtype=torch.float64).unsqueeze(0)
        return eye if batch is None else eye.expand(batch, 4, 4).clone()
    if isinstance(affine, torch.Tensor):
        a = affine.to(device="cpu", dtype=torch.float64)
    else:
        try:
            a = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ProjectorInputError(f"affine must be a (4, 4) or (B, 4, 4) array of numbers: {exc}") from None
    shape = tuple(a.shape)
    if a.ndim == 2:
        a = a.unsqueeze(0)
    if a.ndim != 3 or tuple(a.shape[1:]) != (4, 4):
        raise ProjectorInputError(f"affine must have shape (4, 4) or (B, 4, 4) (voxel index -> world mm), got {shape}")
    if batch is not None and a.shape[0] != batch:
        if a.shape[0] != 1 or len(shape) == 3:
            raise ProjectorInputError(f"affine has {a.shape[0]} entries but the volume batch has {batch}")
        a = a.expand(batch, 4, 4)
    if not _compiling():
        ad = a.detach()
        if not torch.isfinite(ad).all():
            raise ProjectorInputError("affine contains NaN or Inf")
        if not torch.allclose(ad[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(a.shape[0], 4)):
            raise ProjectorInputError("affine's last row must be [0, 0, 0, 1]")
        det = torch.linalg.det(ad[:, :3, :3])
        scale = ad[:, :3, :3].abs().amax(dim=(1, 2)) ** 3
        if (det.abs() <= 1e-12 * scale).any():
            raise ProjectorInputError("affine is singular (zero voxel spacing or collinear axes)")
    return a.contiguous()


def min_spacing(affine_b: torch.Tensor) -> torch.Tensor:
    """Smallest voxel spacing (mm) per batch entry, (B,) float64 (differentiable: it sets the trilinear step)."""
    return affine_b[:, :3, :3].norm(dim=1).amin(dim=1)


def ray_params(geometry: Geometry, affine_b: torch.Tensor) -> torch.Tensor:
    """(B, V, 24) float64 CPU tensor of index-space ray parameters (layout: :mod:`xwin.kernels.layout`).

    Differentiable with respect to the geometry's tensors and ``affine_b`` (plain torch arithmetic)."""
    cpu = lambda t: t.to(device="cpu", dtype=torch.float64)
    m = affine_b[:, :3, :3]                      # (B,3,3)
    off = affine_b[:, :3, 3]                     # (B,3)
    minv = torch.linalg.inv(m)
    shift = torch.einsum("bij,bj->bi", minv, off)[:, None]
    to_idx = lambda p: torch.einsum("bij,vj->bvi", minv, cpu(p)) - shift
    to_idx_vec = lambda d: torch.einsum("bij,vj->bvi", minv, cpu(d))
    if geometry.kind == "cone":
        first = to_idx(geometry.source)
    else:
        d = cpu(geometry.direction)
        first = to_idx_vec(d / d.norm(dim=1, keepdim=True))
    B, V = affine_b.shape[0], geometry.num_views
    parts = {RAY_FIRST: first, RAY_CENTER: to_idx(geometry.center), RAY_U: to_idx_vec(geometry.u),
             RAY_V: to_idx_vec(geometry.v), RAY_M: m.reshape(B, 1, 9).expand(B, V, 9)}
    cols, at = [], 0
    for start in sorted(parts):
        assert start == at
        cols.append(parts[start])
        at = start + parts[start].shape[-1]
    cols.append(first.new_zeros(B, V, RAY_RECORD - at))
    return torch.cat(cols, dim=-1).contiguous()


def output_dtype(vol_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if vol_dtype == torch.float64 else torch.float32
