"""Input checks and per-view ray parameters shared by the torch reference and the Triton kernels.

Rays are described in *index space* (voxel (i, j, k) centre at integer coordinates) with the ray parameter
``t`` in world millimetres, so segment lengths come out in mm whatever the affine:

* cone beam: ``q(t) = S + t · d / |M d|`` with ``d = P − S`` (index-space source S, pixel P) and
  ``t ∈ [0, |M d|]``; ``M`` is the affine's 3×3 part, so ``|M d|`` is the world length source→pixel;
* parallel beam: ``q(t) = P + t · E`` with ``E = M⁻¹ · direction/|direction|``, ``t ∈ (−∞, ∞)``.

Per (batch b, view n) we pack 24 float64 numbers: ``[S or E (3), C (3), U (3), V (3), M (9), 0, 0, 0]``,
where ``C, U, V`` are the detector centre and steps mapped to index space.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from xwin.geometry import Geometry
from xwin.errors import XwinError

__all__ = ["ProjectorInputError", "check_volume", "check_method", "affine_batch", "ray_params", "NPARAM"]

NPARAM = 24
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
METHODS = ("siddon", "trilinear")


class ProjectorInputError(XwinError):
    """Bad input to project/backproject: wrong rank, dtype, device, empty volume, ..."""


def check_method(method: str, step: float) -> Tuple[str, float]:
    if method not in METHODS:
        raise ProjectorInputError(f"method must be one of {METHODS}, got {method!r}")
    step = float(step)
    if method == "trilinear" and not (math.isfinite(step) and step > 0):
        raise ProjectorInputError(f"trilinear step must be a positive finite number (in voxels), got {step}")
    return method, step


def check_volume(volume, name: str = "volume") -> Tuple[torch.Tensor, bool]:
    """Return the volume as (B, X, Y, Z) and whether the batch axis was added."""
    if not isinstance(volume, torch.Tensor):
        raise ProjectorInputError(f"{name} must be a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim not in (3, 4):
        raise ProjectorInputError(f"{name} must have shape (X, Y, Z) or (B, X, Y, Z), got {tuple(volume.shape)}")
    if volume.numel() == 0:
        raise ProjectorInputError(f"{name} is empty: shape {tuple(volume.shape)}")
    if volume.dtype not in _FLOATS:
        raise ProjectorInputError(f"{name} must be float16, bfloat16, float32 or float64, got {volume.dtype}")
    squeeze = volume.ndim == 3
    return (volume.unsqueeze(0) if squeeze else volume), squeeze


def check_geometry(geometry, device: torch.device) -> Geometry:
    if not isinstance(geometry, Geometry):
        raise ProjectorInputError(f"geometry must be an xwin.geometry.Geometry, got {type(geometry).__name__}")
    gdev = geometry.device
    if gdev.type != "cpu" and gdev != device:
        raise ProjectorInputError(f"geometry lives on {gdev} but the data on {device}; move one with .to()")
    return geometry


def affine_batch(affine, batch: int) -> torch.Tensor:
    """(B, 4, 4) float64 CPU tensor from None, a (4, 4) or a (B, 4, 4) array."""
    if affine is None:
        return torch.eye(4, dtype=torch.float64).expand(batch, 4, 4).clone()
    a = torch.as_tensor(np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine,
                                   dtype=np.float64))
    if a.ndim == 2:
        a = a.unsqueeze(0).expand(batch, 4, 4)
    if a.ndim != 3 or a.shape[1:] != (4, 4):
        raise ProjectorInputError(f"affine must have shape (4, 4) or (B, 4, 4), got {tuple(a.shape)}")
    if a.shape[0] != batch:
        raise ProjectorInputError(f"affine has {a.shape[0]} entries but the volume batch has {batch}")
    if not torch.isfinite(a).all():
        raise ProjectorInputError("affine contains NaN or Inf")
    if not torch.allclose(a[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(a.shape[0], 4)):
        raise ProjectorInputError("affine's last row must be [0, 0, 0, 1]")
    det = torch.linalg.det(a[:, :3, :3])
    scale = a[:, :3, :3].abs().amax(dim=(1, 2)) ** 3
    if (det.abs() <= 1e-12 * scale).any():
        raise ProjectorInputError("affine is singular (zero voxel spacing or collinear axes)")
    return a.contiguous()


def min_spacing(affine_b: torch.Tensor) -> torch.Tensor:
    """Smallest voxel spacing (mm) per batch entry, (B,) float64."""
    return affine_b[:, :3, :3].norm(dim=1).amin(dim=1)


def ray_params(geometry: Geometry, affine_b: torch.Tensor) -> torch.Tensor:
    """(B, V, 24) float64 CPU tensor of index-space ray parameters (see module docstring)."""
    g = geometry.to("cpu")
    m = affine_b[:, :3, :3]                      # (B,3,3)
    off = affine_b[:, :3, 3]                     # (B,3)
    minv = torch.linalg.inv(m)
    to_idx = lambda p: torch.einsum("bij,vj->bvi", minv, p) - torch.einsum("bij,bj->bi", minv, off)[:, None]
    to_idx_vec = lambda d: torch.einsum("bij,vj->bvi", minv, d)
    if g.kind == "cone":
        first = to_idx(g.source)
    else:
        first = to_idx_vec(g.direction / g.direction.norm(dim=1, keepdim=True))
    B, V = affine_b.shape[0], g.num_views
    out = torch.zeros(B, V, NPARAM, dtype=torch.float64)
    out[..., 0:3] = first
    out[..., 3:6] = to_idx(g.center)
    out[..., 6:9] = to_idx_vec(g.u)
    out[..., 9:12] = to_idx_vec(g.v)
    out[..., 12:21] = m.reshape(B, 1, 9).expand(B, V, 9)
    return out


def output_dtype(vol_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if vol_dtype == torch.float64 else torch.float32
