"""Loading a CT volume from whatever it is stored as: :func:`load_volume` sniffs NIfTI / DICOM."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import (_GZIP_MAGIC, PathLike, XwinIOError, _check_exists, _read_head, _is_dicom_bytes, _is_nifti_bytes,
                      _is_raster_image_bytes)
from .dicom import read_dicom_series
from .metaimage import read_metaimage
from .nifti import read_nifti
from .volume import Volume

__all__ = ["load_volume", "read_metaimage_volume"]


def load_volume(path: PathLike, *, dtype: torch.dtype = torch.float32, series: Optional[str] = None) -> Volume:
    """Load a CT volume as a :class:`Volume` in HU with its voxel -> world (mm, RAS+) affine.

    * ``.nii`` / ``.nii.gz`` (NIfTI-1/2) through nibabel; ``scl_slope``/``scl_inter`` are applied and the
      affine is nibabel's (sform if set, else qform). The array is kept in stored index order
      (no reorientation): ``data[i, j, k]`` is ``get_fdata()[i, j, k]``.
    * A folder holding one DICOM series (needs ``pydicom``): slices are sorted by their position along
      the slice normal (not by file name or InstanceNumber), each slice's RescaleSlope/Intercept is
      applied, and the affine is built from PixelSpacing, ImageOrientationPatient and the slice
      positions, converted from DICOM's LPS to RAS+. ``series`` picks one SeriesInstanceUID when the
      folder holds several (otherwise that is an error). A single DICOM file of the series may be
      given instead of the folder; its whole series (same folder) is loaded.

    ``dtype``: tensor dtype of the data (float32 by default; an integer dtype rounds, for label maps).
    Raises :class:`XwinIOError` naming the problem and the file.
    """
    p = _check_exists(path)
    if p.is_dir():
        vol = read_dicom_series(p, series=series)
    else:
        head = _read_head(p)
        name = p.name.lower()
        if head.startswith(_GZIP_MAGIC) or _is_nifti_bytes(head) or name.endswith((".nii", ".nii.gz")):
            vol = read_nifti(p)
        elif name.endswith((".mha", ".mhd")):
            vol = read_metaimage_volume(p)
        elif _is_dicom_bytes(head) or name.endswith((".dcm", ".dicom")):
            vol = read_dicom_series(p.parent, series=series, only_file=p)
        elif _is_raster_image_bytes(head):
            raise XwinIOError(
                f"2D image given as a volume: {p} is a PNG/JPEG/TIFF picture, not a 3D volume "
                "(use xwin.io.load_radiograph for radiographs)"
            )
        else:
            raise XwinIOError(
                f"not a volume file: {p} is neither NIfTI (.nii/.nii.gz) nor DICOM nor MetaImage "
                f"(first bytes {head[:8]!r})"
            )
    if dtype.is_floating_point:
        data = vol.data.to(dtype)
    else:
        data = torch.round(vol.data).to(dtype)
    return Volume(data, vol.affine)


def read_metaimage_volume(p) -> Volume:
    """A 3-D ITK MetaImage (.mha/.mhd, e.g. an RTK volume) as a float32 :class:`Volume`.

    ITK's physical space is LPS: the affine is ``diag(-1, -1, 1, 1) @ index_to_physical`` (RAS+), and the
    array is transposed from ITK's numpy order [k, j, i] to xwin's [i, j, k].
    """
    import numpy as np

    from .projections import LPS_TO_RAS

    mi = read_metaimage(p)
    if mi.array.ndim != 3:
        raise XwinIOError(f"MetaImage {p} is {mi.array.ndim}-D, a volume must be 3-D")
    data = np.ascontiguousarray(np.transpose(mi.array, (2, 1, 0)), dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise XwinIOError(f"NaN or Inf voxel values in {p}")
    return Volume(torch.from_numpy(data), LPS_TO_RAS @ mi.index_to_physical())
