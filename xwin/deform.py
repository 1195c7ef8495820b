"""Random smooth deformations of a CT volume, so that synthetic patients made from one CT differ.

A :class:`Deformation` is a seeded map of world space onto itself: an anisotropic scaling about the
volume centre (chest width, anterior-posterior depth and height vary independently), a small rotation
about the cranio-caudal axis, and a smooth displacement field (random displacements on a coarse grid of
control points, interpolated trilinearly and smoothed). It is applied by resampling on the volume's own
grid (same shape, same affine), so a CT and its label map deformed by the same :class:`Deformation` stay
aligned voxel for voxel.

* :func:`random_deformation` ``(volume, seed, strength) -> Deformation``
* :func:`random_patient` ``(volume, seed, strength) -> Volume``: the deformed CT in one call.

``strength`` scales every random amplitude: 0 is the identity, 1 the default spread (width and height
±8 %, depth ±12 %, rotation ±4°, displacements of about 6 mm), 2 twice that. Deterministic: the same
volume grid, seed and strength give the same result on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import XwinError
from .io import Volume

__all__ = ["Deformation", "random_deformation", "random_patient", "DeformError"]

# Default spreads at strength 1 (half-widths of uniform draws).
_SCALE_SPREAD = (0.08, 0.12, 0.08)  # relative, along world x (left-right), y (AP), z (height)
_ROT_SPREAD_DEG = 4.0
_DISP_MM = 6.0
_CONTROL_POINTS = 5


class DeformError(XwinError):
    """Bad arguments for a deformation (negative strength, a volume without spatial extent, ...)."""


@dataclass
class Deformation:
    """World-space map p_out -> p_src = c + A (p_out - c) - d(p_out), applied by pulling values from p_src.

    ``scale`` (3,) and ``rot_z_deg`` define A = R_z(-rot) · diag(1/scale) (so anatomy is *stretched* by
    ``scale`` about the centre ``center`` (world mm)); ``disp`` (3, n, n, n) holds displacements in mm at
    a regular grid of control points spanning the volume's bounding box.
    """

    center: np.ndarray
    scale: np.ndarray
    rot_z_deg: float
    disp: torch.Tensor

    def source_points(self, volume: Volume) -> torch.Tensor:
        """World mm (X, Y, Z, 3) float64 of the points each output voxel takes its value from."""
        shape = volume.spatial_shape
        ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
        aff = torch.as_tensor(volume.affine, dtype=torch.float64)
        p = ijk @ aff[:3, :3].T + aff[:3, 3]
        c = torch.as_tensor(self.center, dtype=torch.float64)
        t = np.deg2rad(self.rot_z_deg)
        rz = torch.tensor([[np.cos(t), np.sin(t), 0.0], [-np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]],
                          dtype=torch.float64)
        a = rz @ torch.diag(torch.as_tensor(1.0 / self.scale, dtype=torch.float64))
        # displacement field sampled at the output voxels: control grid spans the voxel index box
        d = self.disp.to(torch.float64)[None]  # (1, 3, n, n, n)
        norm = ijk / torch.as_tensor([max(n - 1, 1) for n in shape], dtype=torch.float64) * 2.0 - 1.0
        grid = norm.flip(-1)[None]  # grid_sample wants (x=W=k, y=H=j, z=D=i)
        dd = F.grid_sample(d, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        dd = dd.permute(1, 2, 3, 0)  # (X, Y, Z, 3)
        return c + (p - c) @ a.T - dd

    def apply(self, volume: Volume, mode: Optional[str] = None, fill: Optional[float] = None) -> Volume:
        """The deformed volume on the same grid.

        ``mode``: "linear" (default for floating data, e.g. HU) or "nearest" (default for integer label
        maps). ``fill``: value for points pulled from outside the volume; default -1000 (air) for
        floating data, 0 (background) for integer data.
        """
        if volume.data.dim() != 3:
            raise DeformError(f"deformation expects one (X, Y, Z) volume, got shape {volume.shape}")
        integer = not (volume.data.is_floating_point() or volume.data.is_complex())
        mode = mode or ("nearest" if integer else "linear")
        if mode not in ("linear", "nearest"):
            raise DeformError(f"mode must be 'linear' or 'nearest', got {mode!r}")
        if fill is None:
            fill = 0.0 if integer else -1000.0
        src = self.source_points(volume)
        inv = torch.as_tensor(np.linalg.inv(volume.affine), dtype=torch.float64)
        ijk = src @ inv[:3, :3].T + inv[:3, 3]
        shape = volume.spatial_shape
        norm = ijk / torch.as_tensor([max(n - 1, 1) for n in shape], dtype=torch.float64) * 2.0 - 1.0
        grid = norm.flip(-1)[None].float()
        x = volume.data.float()[None, None] - float(fill)  # zero padding == fill
        out = F.grid_sample(x, grid, mode="nearest" if mode == "nearest" else "bilinear", padding_mode="zeros",
                            align_corners=True)[0, 0] + float(fill)
        if integer:
            out = out.round().to(volume.data.dtype)
        return Volume(out.to(volume.data.device), volume.affine.copy())


def random_deformation(volume: Volume, seed: int, strength: float = 1.0) -> Deformation:
    """A seeded random :class:`Deformation` for ``volume``'s grid (see the module notes for the spread)."""
    strength = float(strength)
    if not np.isfinite(strength) or strength < 0:
        raise DeformError(f"strength must be a finite number >= 0, got {strength}")
    if min(volume.spatial_shape) < 2:
        raise DeformError(f"volume too small to deform: spatial shape {volume.spatial_shape}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    spread = np.asarray(_SCALE_SPREAD) * strength
    scale = 1.0 + rng.uniform(-1.0, 1.0, 3) * spread
    scale = np.clip(scale, 0.5, 2.0)
    rot = float(rng.uniform(-1.0, 1.0) * _ROT_SPREAD_DEG * strength)
    n = _CONTROL_POINTS
    disp = torch.as_tensor(rng.normal(0.0, _DISP_MM * strength, (3, n, n, n)), dtype=torch.float64)
    # smooth the control displacements a little (neighbour averaging) so the field has no sharp kinks
    disp = F.avg_pool3d(F.pad(disp[None], (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)[0] * 1.5
    return Deformation(center=np.asarray(volume.center_world, dtype=np.float64), scale=scale, rot_z_deg=rot,
                       disp=disp)


def random_patient(volume: Volume, seed: int, strength: float = 1.0) -> Volume:
    """A new synthetic patient: ``volume`` (HU, or any floating data) under :func:`random_deformation`.

    Same grid and affine as the input; outside values are filled with -1000 HU (air). To deform a label
    map consistently, use ``d = random_deformation(ct, seed, strength)`` then ``d.apply(ct)`` and
    ``d.apply(labels)`` (nearest neighbour for integer data).
    """
    return random_deformation(volume, seed, strength).apply(volume)
