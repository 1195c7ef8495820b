"""Volumes and radiographs in and out.

Conventions (see docs/architecture.md): a volume tensor is ``(X, Y, Z)`` indexed ``[i, j, k]`` exactly as
``nibabel.load(f).get_fdata()`` returns it, and ``affine`` (4x4, float64) maps the voxel index
``(i, j, k, 1)`` to world millimetres in NIfTI RAS+ (+x towards the patient's right, +y anterior,
+z superior; DICOM's LPS differs by the sign of x and y). Voxel centres sit at integer indices.

What is here (one module per job; everything is importable from ``xwin.io``):

* :class:`Volume` (:mod:`.volume`) - data tensor plus affine, with ``shape``, ``spacing``, ``center_world``.
  The one volume type of xwin.
* :func:`load_volume` (:mod:`.load`) - NIfTI (:mod:`.nifti`, nibabel, scl_slope/scl_inter applied) or a
  DICOM series folder (:mod:`.dicom`, pydicom: sorted along the slice normal, rescaled, LPS -> RAS+).
* :func:`save_volume` (:mod:`.nifti`) - NIfTI out.
* :func:`resample`, :func:`crop_or_pad` (:mod:`.grid`) - onto a new grid about the same centre; to a
  fixed shape about the body.
* :func:`load_projections` (:mod:`.projections`) - projection stacks (MetaImage, NIfTI, .npy) for
  reconstruction; :func:`read_metaimage` / :func:`write_metaimage` (:mod:`.metaimage`) - ITK MetaImage.
  :func:`load_volume` also reads a 3-D MetaImage volume (ITK's LPS -> RAS+).
* :func:`load_radiograph` (:mod:`.radiograph`) - DICOM / PNG / JPEG / TIFF radiograph as ``(H, W)``
  float32 in [0, 1], "bright = dense".

Every failure to read a file raises :class:`XwinIOError` (a ``ValueError``) whose message names the
problem and the file.
"""

from __future__ import annotations

from ._common import XwinIOError
from .grid import crop_or_pad, resample
from .load import load_volume
from .metaimage import read_metaimage, write_metaimage
from .nifti import save_volume
from .projections import ProjectionStack, load_projections
from .radiograph import load_radiograph
from .volume import Volume

__all__ = [
    "XwinIOError",
    "Volume",
    "load_volume",
    "save_volume",
    "resample",
    "crop_or_pad",
    "load_radiograph",
    "load_projections",
    "ProjectionStack",
    "read_metaimage",
    "write_metaimage",
]
