"""DICOM: reading files and decoding pixels (shared with radiographs), and a CT series folder as a
:class:`Volume`, in named steps:

1. :func:`_collect_headers` - every file in the folder that reads as a DICOM image header;
2. :func:`_pick_series` - one SeriesInstanceUID (given, or the only one; several is an error);
3. :func:`_check_slices` - a real series (not one slice / multi-frame), every slice placeable and with the
   same orientation, size and pixel spacing;
4. :func:`_sort_slices` - sorted by position along the slice normal, evenly spaced (missing, duplicate
   or irregular slices are errors);
5. :func:`_read_voxels` - pixel data, rescaled per slice, as ``data[i, j, k] = slice_k[row j, column i]``;
6. :func:`_series_affine` - voxel -> world from PixelSpacing, ImageOrientationPatient and the slice
   positions, DICOM LPS converted to RAS+.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ._common import PathLike, XwinIOError, _head, _is_dicom_bytes
from .volume import Volume

__all__ = ["read_dicom_series"]


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


def read_dicom_series(folder: Path, series: Optional[str] = None, only_file: Optional[Path] = None) -> Volume:
    """The DICOM series in ``folder`` as a float32 :class:`Volume` (HU, RAS+ affine); see the module steps.

    ``only_file``: load the series this file belongs to (unless ``series`` names another one).
    """
    if only_file is not None:
        ds0 = _read_dicom(only_file, stop_before_pixels=True)
        series = series or str(getattr(ds0, "SeriesInstanceUID", "")) or None
    headers = _pick_series(_collect_headers(folder), series, folder)
    iop, ps, rc = _check_slices(headers, folder)
    row_cos = iop[:3] / np.linalg.norm(iop[:3])  # direction of increasing column index
    col_cos = iop[3:] / np.linalg.norm(iop[3:])  # direction of increasing row index
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1e-6:
        raise XwinIOError(f"degenerate ImageOrientationPatient {iop.tolist()} in {headers[0][0]}")
    headers, ipp = _sort_slices(headers, normal, folder)
    data = _read_voxels(headers, rc)
    return Volume(torch.from_numpy(data), _series_affine(row_cos, col_cos, ps, ipp))


Headers = List[Tuple[Path, object]]


def _collect_headers(folder: Path) -> Headers:
    pydicom = _require_pydicom(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
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
    return headers


def _pick_series(headers: Headers, series: Optional[str], folder: Path) -> Headers:
    by_series: dict = {}
    for f, ds in headers:
        by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append((f, ds))
    if series is not None:
        if series not in by_series:
            raise XwinIOError(
                f"series {series} not found in DICOM folder {folder}; it holds: {sorted(by_series)}"
            )
        return by_series[series]
    if len(by_series) > 1:
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
    return headers


def _check_slices(headers: Headers, folder: Path):
    """(ImageOrientationPatient, PixelSpacing, (rows, columns)) shared by every slice of the series."""
    if len(headers) == 1:  # a multi-frame single file (enhanced CT) is not supported here
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
    return iop0, ps0, rc0


def _sort_slices(headers: Headers, normal: np.ndarray, folder: Path):
    """Slices sorted along the slice normal, with their ImagePositionPatient (n, 3); even spacing checked."""
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
    return headers, ipp


def _read_voxels(headers: Headers, rc) -> np.ndarray:
    """``data[i, j, k] = slice_k[row j, column i]``, float32, rescaled per slice."""
    data = np.empty((rc[1], rc[0], len(headers)), dtype=np.float32)
    for k, (f, _) in enumerate(headers):
        ds = _read_dicom(f)
        arr = _pixels(ds, f)
        if arr.ndim != 2:
            raise XwinIOError(f"DICOM slice {f} is not a single greyscale frame (pixel array shape {arr.shape})")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        data[:, :, k] = (arr.astype(np.float32) * np.float32(slope) + np.float32(inter)).T
    return data


def _series_affine(row_cos, col_cos, ps, ipp) -> np.ndarray:
    """Voxel -> world (RAS+) of sorted slices: built in DICOM's LPS, then x and y negated."""
    n = ipp.shape[0]
    aff = np.eye(4)
    aff[:3, 0] = row_cos * ps[1]  # column index i moves along the row direction by column spacing
    aff[:3, 1] = col_cos * ps[0]  # row index j moves along the column direction by row spacing
    aff[:3, 2] = (ipp[-1] - ipp[0]) / (n - 1)  # real slice step (handles gantry tilt)
    aff[:3, 3] = ipp[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
