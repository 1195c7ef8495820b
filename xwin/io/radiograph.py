"""Radiographs in: :func:`load_radiograph` reads DICOM (VOI LUT / window, MONOCHROME1) or PNG/JPEG/TIFF as an
``(H, W)`` float32 image in [0, 1], "bright = dense"."""

from __future__ import annotations

import numpy as np
import torch
from pathlib import Path

from ._common import (_GZIP_MAGIC, PathLike, XwinIOError, _check_exists, _read_head, _is_dicom_bytes, _is_nifti_bytes,
                      _is_raster_image_bytes)
from .dicom import _pixels, _read_dicom

__all__ = ["load_radiograph"]


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
    head = _read_head(p)
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
