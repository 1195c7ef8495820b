"""Volumes and radiographs in and out.

Conventions (see DESIGN.md): a volume tensor is ``(X, Y, Z)`` indexed ``[i, j, k]`` exactly as
``nibabel.load(f).get_fdata()`` returns it, and ``affine`` (4x4, float64) maps the voxel index
``(i, j, k, 1)`` to world millimetres in NIfTI RAS+ (+x towards the patient's right, +y anterior,
+z superior; DICOM's LPS differs by the sign of x and y). Voxel centres sit at integer indices.

What is here:

* :class:`Volume` - data tensor plus affine, with ``shape``, ``spacing``, ``center_world``.
* :func:`load_volume` / :func:`save_volume` - NIfTI through nibabel (scl_slope/scl_inter applied),
  a DICOM series folder through pydicom (sorted along the slice normal, rescaled, LPS -> RAS+).
* :func:`resample` - trilinear (or nearest, for label maps) onto a new grid with the same centre.
* :func:`crop_or_pad` - to a fixed shape about the body, for batching CTs of different sizes.
* :func:`load_radiograph` - DICOM / PNG / JPEG / TIFF radiograph as ``(H, W)`` float32 in [0, 1],
  "bright = dense".

Every failure to read a file raises :class:`XwinIOError` (a ``ValueError``) whose message names the
problem and the file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from .errors import XwinError

__all__ = [
    "XwinIOError",
    "Volume",
    "load_volume",
    "save_volume",
    "resample",
    "crop_or_pad",
    "load_radiograph",
]

PathLike = Union[str, Path]


class XwinIOError(XwinError):
    """A file or folder could not be read as what was asked; the message names the problem and path."""


# --------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Sniffing file types
# --------------------------------------------------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_GZIP_MAGIC = b"\x1f\x8b"


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _is_nifti_bytes(head: bytes) -> bool:
    """NIfTI-1 (348-byte header, magic at 344) or NIfTI-2 (540-byte header, magic at 4)."""
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    if len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return True
    return False


def _is_raster_image_bytes(head: bytes) -> bool:
    return head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC) or head[:4] in _TIFF_MAGICS


def _check_exists(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise XwinIOError(f"file not found: {p}")
    return p


# --------------------------------------------------------------------------------------------------
# Volumes: load / save
# --------------------------------------------------------------------------------------------------


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
        vol = _load_dicom_series(p, series=series)
    else:
        try:
            head = _head(p)
        except OSError as e:
            raise XwinIOError(f"cannot read {p}: {e}") from e
        if len(head) == 0:
            raise XwinIOError(f"empty file: {p}")
        name = p.name.lower()
        if head.startswith(_GZIP_MAGIC) or _is_nifti_bytes(head) or name.endswith((".nii", ".nii.gz")):
            vol = _load_nifti(p)
        elif _is_dicom_bytes(head) or name.endswith((".dcm", ".dicom")):
            vol = _load_dicom_series(p.parent, series=series, only_file=p)
        elif _is_raster_image_bytes(head):
            raise XwinIOError(
                f"2D image given as a volume: {p} is a PNG/JPEG/TIFF picture, not a 3D volume "
                "(use xwin.io.load_radiograph for radiographs)"
            )
        else:
            raise XwinIOError(
                f"not a volume file: {p} is neither NIfTI (.nii/.nii.gz) nor DICOM "
                f"(first bytes {head[:8]!r})"
            )
    if dtype.is_floating_point:
        data = vol.data.to(dtype)
    else:
        data = torch.round(vol.data).to(dtype)
    return Volume(data, vol.affine)


def _load_nifti(p: Path) -> Volume:
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


def _require_pydicom(what: PathLike):
    try:
        import pydicom  # noqa: F401
    except ImportError as e:  # pragma: no cover - pydicom is a test dependency
        raise XwinIOError(
            f"reading DICOM ({what}) needs pydicom: pip install 'xwin[dicom]'"
        ) from e
    return pydicom


_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow, pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls, or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls, or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pillow (with OpenJPEG), pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pillow (with OpenJPEG), pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "numpy (built in), pylibjpeg-rle, or python-gdcm",
}


def _pixels(ds, path: Path) -> np.ndarray:
    """``ds.pixel_array`` with decoder failures turned into an error that names the decoder to install."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown transfer syntax"
        hint = _DECODER_HINTS.get(str(ts)) if ts is not None else None
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise XwinIOError(f"no pixel data in DICOM file {path}") from e
        msg = f"cannot decode the pixel data of {path} (transfer syntax: {ts_name})"
        if hint:
            msg += f": a decoder is missing, install one of: {hint}"
        msg += f". pydicom said: {e}"
        raise XwinIOError(msg) from e


def _read_dicom(path: Path, stop_before_pixels: bool = False):
    pydicom = _require_pydicom(path)
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise XwinIOError(f"not a readable DICOM file: {path}: {e}") from e


def _load_dicom_series(folder: Path, series: Optional[str] = None, only_file: Optional[Path] = None) -> Volume:
    pydicom = _require_pydicom(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if only_file is not None:
        # Load the series the given file belongs to.
        ds0 = _read_dicom(only_file, stop_before_pixels=True)
        series = series or str(getattr(ds0, "SeriesInstanceUID", "")) or None
    headers = []
    for f in files:
        if f.name.upper() == "DICOMDIR":
            continue
        try:
            if not _is_dicom_bytes(_head(f, 132)) and f.suffix.lower() not in (".dcm", ".dicom", ""):
                continue
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=not _is_dicom_bytes(_head(f, 132)))
        except Exception:
            continue
        if "ImagePositionPatient" not in ds and "Rows" not in ds and "PixelData" not in ds:
            # force=True happily "reads" garbage; keep only files that look like images
            if "SOPClassUID" not in ds:
                continue
        headers.append((f, ds))
    if not headers:
        raise XwinIOError(f"no DICOM files in folder {folder}")

    # One series only.
    by_series: dict = {}
    for f, ds in headers:
        by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append((f, ds))
    if series is not None:
        if series not in by_series:
            raise XwinIOError(
                f"series {series} not found in DICOM folder {folder}; it holds: {sorted(by_series)}"
            )
        headers = by_series[series]
    elif len(by_series) > 1:
        desc = "; ".join(
            f"{uid} ({len(v)} files, e.g. {v[0][0].name}"
            + (f", '{v[0][1].SeriesDescription}'" if "SeriesDescription" in v[0][1] else "")
            + ")"
            for uid, v in sorted(by_series.items())
        )
        raise XwinIOError(
            f"mixed series: DICOM folder {folder} holds {len(by_series)} series: {desc}. "
            "Pass series=<SeriesInstanceUID> or a folder with a single series"
        )

    # Multi-frame single file (enhanced CT) is not supported here.
    if len(headers) == 1:
        f, ds = headers[0]
        nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if nframes > 1:
            raise XwinIOError(
                f"multi-frame DICOM ({nframes} frames) in {f} is not supported: "
                "convert it to NIfTI (e.g. dcm2niix) or to one file per slice"
            )
        raise XwinIOError(
            f"2D image given as a volume: DICOM folder {folder} holds a single slice ({f.name}); "
            "a volume needs a series of at least two slices"
        )

    for f, ds in headers:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise XwinIOError(f"DICOM file {f} lacks {tag}: cannot place it in a volume")

    # Consistent in-plane geometry.
    f0, ds0 = headers[0]
    iop0 = np.asarray([float(v) for v in ds0.ImageOrientationPatient], dtype=np.float64)
    ps0 = np.asarray([float(v) for v in ds0.PixelSpacing], dtype=np.float64)
    rc0 = (int(ds0.Rows), int(ds0.Columns))
    for f, ds in headers[1:]:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if np.max(np.abs(iop - iop0)) > 1e-4:
            raise XwinIOError(
                f"mixed slice orientations in DICOM series in {folder}: {f.name} has "
                f"ImageOrientationPatient {iop.tolist()}, {f0.name} has {iop0.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != rc0:
            raise XwinIOError(
                f"mixed slice sizes in DICOM series in {folder}: {f.name} is {int(ds.Rows)}x{int(ds.Columns)}, "
                f"{f0.name} is {rc0[0]}x{rc0[1]}"
            )
        ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
        if np.max(np.abs(ps - ps0)) > 1e-4 * max(1.0, ps0.max()):
            raise XwinIOError(
                f"mixed pixel spacings in DICOM series in {folder}: {f.name} has {ps.tolist()}, "
                f"{f0.name} has {ps0.tolist()}"
            )
    if np.any(ps0 <= 0):
        raise XwinIOError(f"non-positive PixelSpacing {ps0.tolist()} in {f0}")

    row_cos = iop0[:3] / np.linalg.norm(iop0[:3])  # direction of increasing column index
    col_cos = iop0[3:] / np.linalg.norm(iop0[3:])  # direction of increasing row index
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1e-6:
        raise XwinIOError(f"degenerate ImageOrientationPatient {iop0.tolist()} in {f0}")

    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers], dtype=np.float64)
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    headers = [headers[i] for i in order]
    ipp = ipp[order]
    dist = dist[order]
    gaps = np.diff(dist)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise XwinIOError(
            f"duplicate slice positions in DICOM series in {folder}: {headers[i][0].name} and "
            f"{headers[i + 1][0].name} both sit at {dist[i]:.3f} mm along the slice normal "
            "(mixed acquisitions or echoes?)"
        )
    step = float(np.median(gaps))
    bad = np.abs(gaps - step) > 0.1 * step + 1e-3
    if np.any(bad):
        i = int(np.argmax(bad))
        ratio = gaps[i] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.2:
            missing = int(round(ratio)) - 1
            raise XwinIOError(
                f"missing slices in DICOM series in {folder}: a gap of {gaps[i]:.3f} mm between "
                f"{headers[i][0].name} and {headers[i + 1][0].name} where slices are {step:.3f} mm apart "
                f"({missing} slice(s) missing)"
            )
        raise XwinIOError(
            f"irregular slice spacing in DICOM series in {folder}: {gaps[i]:.3f} mm between "
            f"{headers[i][0].name} and {headers[i + 1][0].name}, {step:.3f} mm elsewhere"
        )

    # Voxel data: data[i, j, k] = slice_k[row j, column i], rescaled per slice.
    n = len(headers)
    data = np.empty((rc0[1], rc0[0], n), dtype=np.float32)
    for k, (f, _) in enumerate(headers):
        ds = _read_dicom(f)
        arr = _pixels(ds, f)
        if arr.ndim != 2:
            raise XwinIOError(f"DICOM slice {f} is not a single greyscale frame (pixel array shape {arr.shape})")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        data[:, :, k] = (arr.astype(np.float32) * np.float32(slope) + np.float32(inter)).T

    # Affine in LPS, then to RAS+.
    aff = np.eye(4)
    aff[:3, 0] = row_cos * ps0[1]  # column index i moves along the row direction by column spacing
    aff[:3, 1] = col_cos * ps0[0]  # row index j moves along the column direction by row spacing
    aff[:3, 2] = (ipp[-1] - ipp[0]) / (n - 1)  # real slice step (handles gantry tilt)
    aff[:3, 3] = ipp[0]
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    return Volume(torch.from_numpy(data), aff)


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


# --------------------------------------------------------------------------------------------------
# Grids: resample, crop / pad
# --------------------------------------------------------------------------------------------------


def _interp_axis(x: torch.Tensor, axis: int, pos: torch.Tensor, n_in: int, mode: str, fill: float) -> torch.Tensor:
    """Sample ``x`` along ``axis`` at fractional indices ``pos`` (1D), linear or nearest.

    Positions within half a voxel of the outer voxel centres take the edge value (the voxel fills its
    cell); positions beyond the cell edges (index < -1/2 or > n - 1/2) take ``fill``.
    """
    outside = (pos < -0.5 - 1e-6) | (pos > n_in - 0.5 + 1e-6)
    p = pos.clamp(0, n_in - 1)
    if mode == "nearest":
        idx = torch.floor(p + 0.5).long().clamp(0, n_in - 1)
        out = torch.index_select(x, axis, idx)
    else:
        i0 = torch.floor(p).long().clamp(0, max(n_in - 2, 0))
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (p - i0.to(p.dtype)).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = -1
        w = w.view(shape)
        out = torch.index_select(x, axis, i0) * (1 - w) + torch.index_select(x, axis, i1) * w
    if outside.any():
        shape = [1] * x.dim()
        shape[axis] = -1
        out = torch.where(outside.view(shape), torch.as_tensor(fill, dtype=out.dtype, device=out.device), out)
    return out


def resample(
    volume: Volume,
    spacing=None,
    shape=None,
    *,
    mode: Optional[str] = None,
    fill: float = -1000.0,
) -> Volume:
    """Resample ``volume`` onto a new grid with the same axes directions and the same world centre.

    * ``spacing`` only: new spacing (mm, scalar or 3), shape = round(old extent / new spacing).
    * ``shape`` only: new shape, spacing = old extent / new shape (extent = shape * spacing is kept).
    * both: exactly that grid, centred where the old one was (regions outside the old grid get ``fill``).

    ``mode``: "trilinear" (default for float data) or "nearest" (default for integer label maps).
    Trilinear is separable 1D linear interpolation along each axis (the exact tensor-product trilinear
    interpolant of the voxel centres). No anti-alias prefilter: downsample by large factors with care.
    """
    if spacing is None and shape is None:
        raise ValueError("resample: give spacing, shape or both")
    old_shape = np.asarray(volume.spatial_shape, dtype=np.int64)
    old_sp = volume.spacing
    if spacing is not None:
        new_sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        if np.any(new_sp <= 0):
            raise ValueError(f"resample: spacing must be positive, got {new_sp}")
    if shape is not None:
        new_shape = np.broadcast_to(np.asarray(shape, dtype=np.int64), (3,)).copy()
        if np.any(new_shape < 1):
            raise ValueError(f"resample: shape must be positive, got {new_shape}")
    if spacing is None:
        new_sp = old_shape * old_sp / new_shape
    if shape is None:
        new_shape = np.maximum(1, np.round(old_shape * old_sp / new_sp)).astype(np.int64)
    if mode is None:
        mode = "trilinear" if (volume.data.is_floating_point() or volume.data.is_complex()) else "nearest"
    if mode not in ("trilinear", "linear", "nearest"):
        raise ValueError(f"resample: mode must be 'trilinear' or 'nearest', got {mode!r}")

    scale = new_sp / old_sp  # old index step per new index step
    offset = (old_shape - 1) / 2.0 - scale * (new_shape - 1) / 2.0
    x = volume.data
    orig_dtype = x.dtype
    if mode != "nearest" and not x.is_floating_point():
        x = x.float()
    nd = x.dim()
    for d in range(3):
        pos = torch.arange(int(new_shape[d]), dtype=torch.float64, device=x.device) * float(scale[d]) + float(offset[d])
        x = _interp_axis(x, nd - 3 + d, pos, int(old_shape[d]), "nearest" if mode == "nearest" else "linear", fill)
    if mode == "nearest":
        x = x.to(orig_dtype)

    new_aff = volume.affine.copy()
    new_aff[:3, :3] = volume.affine[:3, :3] * (new_sp / old_sp)[None, :]
    new_aff[:3, 3] = volume.center_world - new_aff[:3, :3] @ ((new_shape - 1) / 2.0)
    return Volume(x.contiguous(), new_aff)


def crop_or_pad(volume: Volume, shape, fill: float = -1000.0, center=None, threshold: float = -500.0) -> Volume:
    """Crop and/or pad ``volume`` to ``shape`` about a centre, keeping voxel size and world positions.

    ``center``: voxel index (i, j, k) (floats allowed) to put at the middle of the output; default the
    centroid of voxels above ``threshold`` (HU, -500: the body), or the volume centre if none is.
    New voxels get ``fill``. The affine is shifted so every kept voxel keeps its world position.
    """
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(shape), (3,)))
    if any(s < 1 for s in shape):
        raise ValueError(f"crop_or_pad: shape must be positive, got {shape}")
    old = volume.spatial_shape
    x = volume.data
    if center is None:
        body = x > threshold
        if x.dim() == 4:
            body = body.any(0)
        idx = torch.nonzero(body)
        if idx.numel() == 0:
            center = (np.asarray(old, dtype=np.float64) - 1) / 2
        else:
            center = idx.double().mean(0).cpu().numpy()
    center = np.asarray(center, dtype=np.float64)
    start = np.round(center - (np.asarray(shape) - 1) / 2.0).astype(np.int64)

    out = torch.full(x.shape[:-3] + shape, fill, dtype=x.dtype, device=x.device)
    src, dst = [], []
    for d in range(3):
        s0 = max(0, int(start[d]))
        s1 = min(old[d], int(start[d]) + shape[d])
        if s1 <= s0:
            src = None
            break
        src.append(slice(s0, s1))
        dst.append(slice(s0 - int(start[d]), s1 - int(start[d])))
    if src is not None:
        out[(..., *dst)] = x[(..., *src)]
    aff = volume.affine.copy()
    aff[:3, 3] = volume.affine[:3, :3] @ start.astype(np.float64) + volume.affine[:3, 3]
    return Volume(out, aff)


# --------------------------------------------------------------------------------------------------
# Radiographs
# --------------------------------------------------------------------------------------------------


def _window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("window width must be > 0")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError("window width must be >= 1 for LINEAR")
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(v):
    """First value of a multi-valued DICOM element (a plain string or number is returned as is)."""
    if isinstance(v, (str, bytes, int, float)):
        return v
    try:
        return v[0]
    except (TypeError, IndexError, KeyError):
        return v


def _apply_lut(x: np.ndarray, item, p: Path, scale: bool = True) -> np.ndarray:
    """A DICOM lookup table item (LUTDescriptor + LUTData) applied to ``x``.

    Inputs below the first mapped value take the first entry, above the last the last entry.
    ``scale``: divide by the LUT's full output range (2**bits - 1), giving [0, 1] (VOI LUTs).
    """
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise XwinIOError(f"lookup table without LUTDescriptor/LUTData in {p}")
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = 65536 if n == 0 else n
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        lut = np.frombuffer(bytes(data), dtype="<u2" if bits > 8 or len(data) >= 2 * n else np.uint8)
    else:
        lut = np.asarray(data if not np.isscalar(data) else [data], dtype=np.float64)
    lut = np.asarray(lut[:n], dtype=np.float64)
    if lut.size == 0:
        raise XwinIOError(f"empty VOI LUT in {p}")
    idx = np.clip(np.round(x).astype(np.int64) - first, 0, lut.size - 1)
    if not scale:
        return lut[idx]
    top = float(2**bits - 1)
    if lut.max() > top:  # descriptors that understate the bit depth exist in the wild
        top = float(lut.max())
    return lut[idx] / top


def _dicom_radiograph(p: Path) -> np.ndarray:
    ds = _read_dicom(p)
    arr = _pixels(ds, p)
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if nframes > 1:
        raise XwinIOError(f"multi-frame DICOM ({nframes} frames) in {p}: expected a single radiograph")
    if spp > 1 or arr.ndim == 3:
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise XwinIOError(f"unsupported pixel layout {arr.shape} in {p}")
        if photometric.startswith("YBR"):
            arr = arr[..., 0].astype(np.float64)  # luma
        else:
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
    if arr.ndim != 2:
        raise XwinIOError(f"DICOM {p} does not hold a 2D image (pixel array shape {arr.shape})")
    if photometric == "PALETTE COLOR":
        raise XwinIOError(f"palette-colour DICOM {p} is not a radiograph")
    x = arr.astype(np.float64)

    # Modality LUT: rescale slope / intercept.
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0 and "RescaleSlope" not in ds:
        x = _apply_lut(x, ds.ModalityLUTSequence[0], p, scale=False)
    else:
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        x = x * slope + inter

    # VOI: LUT sequence, else window centre/width, else the full range of the image.
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        y = _apply_lut(x, ds.VOILUTSequence[0], p)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        c = float(_first(ds.WindowCenter))
        w = float(_first(ds.WindowWidth))
        func = str(_first(getattr(ds, "VOILUTFunction", "LINEAR")))
        try:
            y = _window(x, c, w, func)
        except ValueError as e:
            raise XwinIOError(f"bad window (center {c}, width {w}) in {p}: {e}") from e
    else:
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    if photometric == "MONOCHROME1":
        y = 1.0 - y  # MONOCHROME1: the lowest value is displayed white
    # "bright = dense" holds for projection radiographs stored by the DICOM display convention.
    return np.clip(y, 0.0, 1.0)


def _raster_radiograph(p: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if mode == "PA" else "RGB")
                mode = im.mode
            if mode == "1":
                im = im.convert("L")
                mode = "L"
            arr = np.array(im)
    except UnidentifiedImageError as e:
        raise XwinIOError(f"not an image: {p}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise XwinIOError(f"truncated or corrupt image file {p}: {e}") from e

    if mode in ("L", "LA"):
        x = arr[..., 0] if arr.ndim == 3 else arr
        x = x.astype(np.float64) / 255.0
    elif mode.startswith("I;16"):
        x = arr.astype(np.float64) / 65535.0
    elif mode == "I":
        a = arr.astype(np.float64)
        # Pillow may open 16-bit greyscale as 32-bit "I".
        x = a / 65535.0 if a.min() >= 0 and a.max() <= 65535 else (a - a.min()) / max(a.max() - a.min(), 1e-12)
    elif mode == "F":
        a = arr.astype(np.float64)
        x = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode not in ("RGB", "RGBA", "RGBX"):
            with Image.open(p) as im:
                arr = np.array(im.convert("RGB"))
        x = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    else:
        raise XwinIOError(f"unsupported image mode {mode!r} in {p}")
    if x.ndim != 2:
        raise XwinIOError(f"image {p} is not 2D (array shape {x.shape})")
    return np.clip(x, 0.0, 1.0)


def load_radiograph(path: PathLike, size=None) -> torch.Tensor:
    """Load a radiograph as an ``(H, W)`` float32 tensor in [0, 1], "bright = dense".

    * DICOM (needs pydicom): rescale slope/intercept (or modality LUT), then the VOI LUT sequence if
      present, else the first window centre/width (LINEAR, LINEAR_EXACT or SIGMOID), else the full
      pixel range; MONOCHROME1 images are inverted so that dense structures are bright. Compressed
      transfer syntaxes decode through whatever pydicom decoders are installed; when none can, the
      error names the transfer syntax and the packages that would decode it.
    * PNG / JPEG / TIFF, 8 or 16 bit (greyscale, or colour converted to luma): taken as displayed,
      i.e. already "bright = dense"; scaled by the bit depth's full range.

    ``size``: int (square ``size x size``) or ``(H, W)``: resized with antialiased bilinear filtering.
    """
    p = _check_exists(path)
    if p.is_dir():
        raise XwinIOError(f"expected a radiograph file, got a folder: {p}")
    try:
        head = _head(p)
    except OSError as e:
        raise XwinIOError(f"cannot read {p}: {e}") from e
    if len(head) == 0:
        raise XwinIOError(f"empty file: {p}")
    if _is_dicom_bytes(head) or p.suffix.lower() in (".dcm", ".dicom"):
        img = _dicom_radiograph(p)
    elif _is_raster_image_bytes(head):
        img = _raster_radiograph(p)
    elif head.startswith(_GZIP_MAGIC) or _is_nifti_bytes(head):
        raise XwinIOError(f"{p} looks like a NIfTI volume, not a radiograph (use xwin.io.load_volume)")
    else:
        # Let Pillow try other raster formats (BMP, WebP, ...) before giving up.
        try:
            img = _raster_radiograph(p)
        except XwinIOError as e:
            raise XwinIOError(
                f"not an image: {p} is neither DICOM nor a PNG/JPEG/TIFF picture (first bytes {head[:8]!r})"
            ) from e
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    if size is not None:
        t = _resize2d(t, size)
    return t


def _resize2d(img: torch.Tensor, size) -> torch.Tensor:
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (H, W), got {size}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size}")
    if tuple(img.shape[-2:]) == hw:
        return img
    x = img.reshape(1, 1, *img.shape[-2:])
    x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(hw).clamp(0.0, 1.0)
