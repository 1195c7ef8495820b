"""Projection stacks in: :func:`load_projections` reads measured or simulated projections for reconstruction.

Formats (by extension):

* ``.mha`` / ``.mhd`` - ITK MetaImage (RTK's projection stacks): ITK axes (i, j, k) = (column, row, view);
  the stack's origin / spacing / direction place the detector pixels in RTK's detector coordinates, which
  :mod:`xwin.reconstruct.rtk` needs to convert an RTK geometry.
* ``.nii`` / ``.nii.gz`` - NIfTI with axes (column, row, view), as ITK writes a stack; the detector frame is
  taken the way ITK reads the file (x and y of the NIfTI affine negated, RAS -> LPS).
* ``.npy`` - an array (V, rows, cols); no detector frame (an RTK geometry then needs the pixel size).

Values are line integrals (∫μ dl, dimensionless) unless ``i0`` is given: then they are intensities and are
converted with p = −log(I / I0); intensities ≤ 0 are clamped to the smallest positive intensity in the stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._common import PathLike, XwinIOError, _check_exists

__all__ = ["ProjectionStack", "load_projections", "LPS_TO_RAS"]

#: diag(-1, -1, 1, 1): ITK's / DICOM's LPS world <-> NIfTI's RAS world (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class ProjectionStack:
    """``data`` (V, rows, cols) float32 line integrals; ``index_to_physical`` (4, 4) maps the ITK index
    (column, row, view, 1) to RTK detector coordinates (None for ``.npy``); ``info`` describes the input."""

    data: torch.Tensor
    index_to_physical: Optional[np.ndarray]
    info: dict


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()


def load_projections(path: PathLike, *, i0: Optional[float] = None) -> ProjectionStack:
    """Read a projection stack (see the module notes); :class:`XwinIOError` for unreadable or bad data."""
    p = _check_exists(path)
    if p.is_dir():
        raise XwinIOError(f"projections must be one file (.mha, .mhd, .nii, .nii.gz or .npy), got a folder: {p}")
    ext = _suffix(p)
    if ext in (".mha", ".mhd"):
        from .metaimage import read_metaimage

        mi = read_metaimage(p)
        arr = mi.array
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise XwinIOError(f"projection stack {p} must be 3-D (column, row, view), got {arr.ndim}-D")
        n = len(mi.origin)                       # 3, or 2 for a single view
        m = np.eye(4)
        m[:n, :n] = mi.direction @ np.diag(mi.spacing)
        m[:n, 3] = mi.origin
        frame = m
    elif ext in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            img = nib.load(str(p))
            vol = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as e:  # nibabel raises many types on bad files
            raise XwinIOError(f"not a readable NIfTI projection stack: {p}: {e}") from e
        if vol.ndim == 4 and vol.shape[3] == 1:
            vol = vol[..., 0]
        if vol.ndim != 3:
            raise XwinIOError(f"projection stack {p} must be 3-D (column, row, view), got shape {vol.shape}")
        arr = np.transpose(vol, (2, 1, 0))
        frame = LPS_TO_RAS @ np.asarray(img.affine, dtype=np.float64)
    elif ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise XwinIOError(f"not a readable .npy projection stack: {p}: {e}") from e
        if arr.ndim != 3:
            raise XwinIOError(f"projection stack {p} must be (V, rows, cols), got shape {arr.shape}")
        frame = None
    else:
        raise XwinIOError(f"unknown projection stack format {p.name!r}: use .mha, .mhd, .nii, .nii.gz or .npy")
    if not np.issubdtype(arr.dtype, np.number):
        raise XwinIOError(f"projection stack {p} holds {arr.dtype}, not numbers")
    data = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise XwinIOError(f"projection stack {p} contains NaN or Inf")
    info = {"path": str(p), "format": ext.lstrip("."), "shape_v_rows_cols": list(data.shape)}
    if i0 is not None:
        if not (i0 > 0 and np.isfinite(i0)):
            raise XwinIOError(f"--i0 must be a positive number, got {i0}")
        pos = data[data > 0]
        if pos.size == 0:
            raise XwinIOError(f"projection stack {p}: no positive intensity, cannot take -log(I/I0)")
        clamped = int((data <= 0).sum())
        data = -np.log(np.maximum(data, pos.min()) / float(i0))
        info.update(i0=float(i0), clamped_pixels=clamped)
    return ProjectionStack(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), frame, info)
