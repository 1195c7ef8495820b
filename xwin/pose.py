"""Rigid (SE(3)) poses of a projection geometry: differentiable builders and pose metrics.

A pose moves the whole imaging system (sources or ray directions, detectors) rigidly in the CT's world
frame (mm): a world point ``x`` of the geometry goes to ``R·(x − pivot) + pivot + t`` and a direction or
detector step ``w`` to ``R·w``. The rotation is given as an axis-angle vector ``ω`` (the so(3) log:
direction = axis, norm = angle in radians; ``R = exp([ω]×)``), the translation ``t`` in mm, the pivot
by default the CT's centre. Everything is plain torch arithmetic, so ``ω`` and ``t`` can require grad and
:func:`xwin.kernels.project` differentiates through the posed geometry (2D/3D registration, see
:mod:`xwin.register`).

Moving the camera by (R, t) about the pivot shows the same image as moving the CT by the inverse
transform; :func:`mtre` measures how far CT points land apart under two poses.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .geometry import Geometry

__all__ = ["so3_exp", "so3_log", "apply_pose", "volume_center", "rotation_distance", "translation_distance",
           "pose_points", "mtre", "volume_corners", "random_pose", "camera_frame", "mtre_geometries"]

ArrayLike = Union[torch.Tensor, Sequence[float], np.ndarray]


def _vec(x: ArrayLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    return t.to(torch.float64)


def _skew(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(w[..., 0])
    x, y, zc = w[..., 0], w[..., 1], w[..., 2]
    return torch.stack([torch.stack([z, -zc, y], -1), torch.stack([zc, z, -x], -1),
                        torch.stack([-y, x, z], -1)], -2)


def so3_exp(omega: ArrayLike) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from axis-angle vectors (..., 3) (Rodrigues), differentiable everywhere
    including ω = 0 (series expansions of sin θ/θ and (1 − cos θ)/θ² below θ² = 1e-8)."""
    w = _vec(omega)
    th2 = (w * w).sum(-1)
    small = th2 < 1e-8
    th2s = torch.where(small, torch.ones_like(th2), th2)
    th = th2s.sqrt()
    a = torch.where(small, 1 - th2 / 6, torch.sin(th) / th)
    b = torch.where(small, 0.5 - th2 / 24, (1 - torch.cos(th)) / th2s)
    K = _skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors (..., 3) of rotation matrices (..., 3, 3) (angles in [0, π])."""
    R = _vec(R)
    v = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    s = 0.5 * v.norm(dim=-1)
    c = 0.5 * (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1)
    th = torch.atan2(s, c)
    small = (s < 1e-7) & (c > 0)
    tiny = s < 1e-300
    scale = torch.where(small, 0.5 + th * th / 12, th / (2 * torch.where(tiny, torch.ones_like(s), s)))
    out = v * scale[..., None]
    near_pi = c < -0.99
    if bool(near_pi.any()):       # axis from the symmetric part: R + I = 2 a aᵀ (up to the angle)
        B = (R + R.transpose(-1, -2)) / 2 - c[..., None, None] * torch.eye(3, dtype=R.dtype, device=R.device)
        col = B.diagonal(dim1=-2, dim2=-1).argmax(-1)
        a = torch.gather(B, -1, col[..., None, None].expand(*B.shape[:-1], 1))[..., 0]
        a = a / a.norm(dim=-1, keepdim=True)
        a = a * torch.sign((a * v).sum(-1, keepdim=True) + 1e-300)
        out = torch.where(near_pi[..., None], a * th[..., None], out)
    return out


def volume_center(shape: Sequence[int], affine=None) -> torch.Tensor:
    """World position (mm) of the centre of a volume's voxel grid, (3,) float64."""
    A = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    c = (np.asarray(shape[-3:], dtype=np.float64) - 1) / 2
    return torch.as_tensor(A[:3, :3] @ c + A[:3, 3])


def volume_corners(shape: Sequence[int], affine=None) -> torch.Tensor:
    """World positions (mm) of the 8 outer corners of a volume's voxel grid, (8, 3) float64."""
    A = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    n = np.asarray(shape[-3:], dtype=np.float64)
    idx = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    return torch.as_tensor(idx @ A[:3, :3].T + A[:3, 3])


def apply_pose(geometry: Geometry, rotation: ArrayLike = (0.0, 0.0, 0.0), translation: ArrayLike = (0.0, 0.0, 0.0),
               pivot: Optional[ArrayLike] = None) -> Geometry:
    """The geometry moved rigidly: points ``x → R·(x − pivot) + pivot + t``, vectors ``w → R·w``.

    Args:
        rotation: axis-angle vector (3,) in radians, or a rotation matrix (3, 3); may require grad.
        translation: (3,) mm; may require grad.
        pivot: (3,) world mm; default the world origin. Pass :func:`volume_center` for the CT's centre.

    The result keeps the autograd history of ``rotation`` and ``translation`` (and of the geometry's
    tensors), so ``project(volume, apply_pose(g, w, t), ...)`` is differentiable with respect to them.
    """
    r = _vec(rotation)
    R = r if r.shape == (3, 3) else so3_exp(r.reshape(3))
    t = _vec(translation).reshape(1, 3)
    c = torch.zeros(1, 3, dtype=torch.float64) if pivot is None else _vec(pivot).reshape(1, 3)
    dev = geometry.device
    R, t, c = R.to(dev), t.to(dev), c.to(dev)
    point = lambda x: (x - c) @ R.T + c + t
    vector = lambda w: w @ R.T
    if geometry.kind == "cone":
        return Geometry.cone(point(geometry.source), point(geometry.center), vector(geometry.u), vector(geometry.v),
                             geometry.rows, geometry.cols)
    return Geometry.parallel(vector(geometry.direction), point(geometry.center), vector(geometry.u),
                             vector(geometry.v), geometry.rows, geometry.cols)


def rotation_distance(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """Geodesic distance on SO(3) (radians, in [0, π]) between rotations given as axis-angle vectors (..., 3)
    or matrices (..., 3, 3): the angle of ``Raᵀ·Rb``."""
    Ra, Rb = (so3_exp(x) if _vec(x).shape[-2:] != (3, 3) else _vec(x) for x in (a, b))
    return so3_log(Ra.transpose(-1, -2) @ Rb).norm(dim=-1)


def translation_distance(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """Euclidean distance (mm) between translations (..., 3)."""
    return (_vec(a) - _vec(b)).norm(dim=-1)


def pose_points(points: ArrayLike, rotation: ArrayLike, translation: ArrayLike, pivot: Optional[ArrayLike] = None,
                inverse: bool = False) -> torch.Tensor:
    """Apply the pose (or its inverse) to world points (N, 3)."""
    p = _vec(points).reshape(-1, 3)
    r = _vec(rotation)
    R = r if r.shape == (3, 3) else so3_exp(r.reshape(3))
    t = _vec(translation).reshape(1, 3)
    c = torch.zeros(1, 3, dtype=torch.float64) if pivot is None else _vec(pivot).reshape(1, 3)
    if inverse:
        return (p - c - t) @ R + c
    return (p - c) @ R.T + c + t


def mtre(pose_a, pose_b, points: ArrayLike, pivot: Optional[ArrayLike] = None) -> torch.Tensor:
    """Mean target registration error (mm) between two camera poses ``(rotation, translation)``.

    Moving the camera by a pose is moving the CT by its inverse; the error is the mean distance between
    where the CT points ``points`` (N, 3) land under the two inverse transforms.
    """
    pa = pose_points(points, *pose_a, pivot=pivot, inverse=True)
    pb = pose_points(points, *pose_b, pivot=pivot, inverse=True)
    return (pa - pb).norm(dim=-1).mean()


def random_pose(max_degrees: float, max_mm: float, generator: Optional[torch.Generator] = None):
    """A random pose: rotation about a uniformly random axis by an angle uniform in [0, max_degrees], and a
    translation in a uniformly random direction of length uniform in [0, max_mm]. Returns (ω, t) float64."""
    def direction():
        d = torch.randn(3, generator=generator, dtype=torch.float64)
        return d / d.norm()

    ang = math.radians(max_degrees) * float(torch.rand((), generator=generator, dtype=torch.float64))
    dist = max_mm * float(torch.rand((), generator=generator, dtype=torch.float64))
    return direction() * ang, direction() * dist


def camera_frame(geometry: Geometry, view: int = 0) -> torch.Tensor:
    """4×4 camera→world matrix of a cone-beam view: origin at the source, axes (u/|u|, v/|v|, n) with n the
    detector normal pointing from the source to the detector."""
    if geometry.kind != "cone":
        raise ValueError("camera_frame needs a cone-beam geometry")
    S, C = geometry.source[view].detach(), geometry.center[view].detach()
    u = geometry.u[view].detach() / geometry.u[view].detach().norm()
    v = geometry.v[view].detach() / geometry.v[view].detach().norm()
    n = torch.linalg.cross(u, v)
    n = n * torch.sign((n * (C - S)).sum())
    F_ = torch.eye(4, dtype=torch.float64)
    F_[:3, :3] = torch.stack([u, v, n], 1)
    F_[:3, 3] = S
    return F_


def mtre_geometries(estimate: Geometry, truth: Geometry, points: ArrayLike, view: int = 0) -> torch.Tensor:
    """mTRE (mm) between two cone-beam views: with ``D`` the rigid motion taking the true camera frame to the
    estimated one, the mean of ``|D⁻¹ x − x|`` over the CT points ``x`` (how far the CT would have to move to
    explain the estimate). Equals :func:`mtre` of the pose for ``estimate = apply_pose(truth, pose)``."""
    D = camera_frame(estimate, view) @ torch.linalg.inv(camera_frame(truth, view))
    p = _vec(points).reshape(-1, 3)
    back = (p - D[:3, 3]) @ D[:3, :3]
    return (back - p).norm(dim=-1).mean()
