"""NIfTI volumes in and out (nibabel): :func:`read_nifti` and :func:`save_volume`."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from ._common import _GZIP_MAGIC, PathLike, XwinIOError, _head, _is_nifti_bytes
from .volume import Volume

__all__ = ["read_nifti", "save_volume"]


def read_nifti(p: Path) -> Volume:
    """A NIfTI-1/2 file (.nii or .nii.gz) as a float32 :class:`Volume`; scl_slope/scl_inter applied."""
    import nibabel as nib

    head = _head(p)
    if head.startswith(_GZIP_MAGIC):
        # Read the whole stream once so that a truncated or corrupt gzip is reported as such.
        try:
            with gzip.open(p, "rb") as f:
                raw = f.read()
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            raise XwinIOError(f"truncated or corrupt gzip stream in {p}: {e}") from e
        if not _is_nifti_bytes(raw[:540]):
            raise XwinIOError(f"not a NIfTI file: {p} is gzip-compressed but holds no NIfTI header")
        try:
            img = nib.Nifti1Image.from_bytes(raw) if raw[344:348] in (b"n+1\x00", b"ni1\x00") else nib.Nifti2Image.from_bytes(raw)
        except Exception as e:  # nibabel raises a zoo of exception types on bad headers
            raise XwinIOError(f"not a valid NIfTI file: {p}: {e}") from e
    else:
        if not _is_nifti_bytes(head):
            raise XwinIOError(f"not a NIfTI file: {p} has no NIfTI header (first bytes {head[:8]!r})")
        try:
            img = nib.load(str(p))
        except Exception as e:
            raise XwinIOError(f"not a valid NIfTI file: {p}: {e}") from e

    shape = tuple(int(s) for s in img.shape)
    # Drop trailing singleton dimensions (X, Y, Z, 1) -> (X, Y, Z).
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or (len(shape) == 3 and shape[2] == 1):
        raise XwinIOError(f"2D image given as a volume: {p} has shape {tuple(img.shape)}, need (X, Y, Z)")
    if len(shape) > 3:
        raise XwinIOError(f"{len(shape)}D image in {p} (shape {tuple(img.shape)}): expected one 3D volume")
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)  # applies scl_slope / scl_inter
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise XwinIOError(f"truncated or unreadable voxel data in {p}: {e}") from e
    if not np.all(np.isfinite(arr)):
        raise XwinIOError(f"NaN or Inf voxel values in {p}")
    return Volume(torch.from_numpy(np.ascontiguousarray(arr)), np.asarray(img.affine, dtype=np.float64))


def save_volume(volume: Volume, path: PathLike, dtype=None) -> None:
    """Write ``volume`` as NIfTI (.nii or .nii.gz), keeping data and affine (sform and qform code 1).

    ``dtype``: numpy dtype stored on disk; default: the data's own (float32 stays float32, integer
    label maps stay integer). Values are written unscaled.
    """
    import nibabel as nib

    p = Path(path).expanduser()
    if not p.name.lower().endswith((".nii", ".nii.gz")):
        raise XwinIOError(f"save_volume writes NIfTI: give a .nii or .nii.gz path, got {p}")
    if volume.data.dim() != 3:
        raise XwinIOError(f"save_volume writes one (X, Y, Z) volume, got shape {volume.shape} for {p}")
    arr = volume.data.detach().cpu().numpy()
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float64)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, volume.affine)
    img.header.set_data_dtype(arr.dtype)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    img.header.set_xyzt_units("mm")
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(p))
