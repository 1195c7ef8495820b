"""The one volume type of xwin: :class:`Volume` (data tensor + voxel -> world mm affine, RAS+)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Volume"]


@dataclass
class Volume:
    """A CT-like volume: ``data`` (X, Y, Z) (or (B, X, Y, Z)) and ``affine`` voxel -> world mm (RAS+).

    ``data`` is float32 HU after :func:`load_volume`; label maps may hold an integer dtype.
    """

    data: torch.Tensor
    affine: np.ndarray

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor):
            self.data = torch.as_tensor(np.asarray(self.data))
        if self.data.dim() not in (3, 4):
            raise ValueError(
                f"Volume data must be (X, Y, Z) or (B, X, Y, Z), got shape {tuple(self.data.shape)}"
            )
        aff = np.asarray(
            self.affine.detach().cpu().numpy() if isinstance(self.affine, torch.Tensor) else self.affine,
            dtype=np.float64,
        )
        if aff.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {aff.shape}")
        if not np.all(np.isfinite(aff)):
            raise ValueError("Volume affine contains NaN or Inf")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError(f"Volume affine is singular:\n{aff}")
        self.affine = aff

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spatial_shape(self) -> tuple:
        """The last three dimensions (X, Y, Z)."""
        return tuple(self.data.shape[-3:])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k: the column norms of ``affine[:3, :3]``."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def center_world(self) -> np.ndarray:
        """World position (mm) of the volume centre, ``affine @ ((shape - 1) / 2, 1)``."""
        c = (np.asarray(self.spatial_shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ c + self.affine[:3, 3]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def to(self, device) -> "Volume":
        """The same volume with its data on ``device`` (or cast, if given a dtype); affine unchanged."""
        return Volume(self.data.to(device), self.affine.copy())

    def with_data(self, new_data) -> "Volume":
        """A Volume with the same affine and new data (same spatial shape)."""
        new_data = new_data if isinstance(new_data, torch.Tensor) else torch.as_tensor(np.asarray(new_data))
        if tuple(new_data.shape[-3:]) != self.spatial_shape:
            raise ValueError(
                f"with_data: new data has spatial shape {tuple(new_data.shape[-3:])}, "
                f"volume has {self.spatial_shape}"
            )
        return Volume(new_data, self.affine.copy())

    def voxel_to_world(self, ijk) -> np.ndarray:
        """World mm of voxel indices ``ijk`` (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz) -> np.ndarray:
        """Voxel indices (float) of world points ``xyz`` (..., 3)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        c = ", ".join(f"{s:.4g}" for s in self.center_world)
        return (
            f"Volume(shape={self.shape}, dtype={self.data.dtype}, device={self.data.device}, "
            f"spacing=({sp}) mm, center_world=({c}) mm)"
        )
