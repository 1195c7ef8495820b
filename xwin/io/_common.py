"""Shared pieces of :mod:`xwin.io`: the error type and file-type sniffing by magic bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import XwinError

PathLike = Union[str, Path]


class XwinIOError(XwinError):
    """A file or folder could not be read as what was asked; the message names the problem and path."""



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



def _read_head(p: Path, n: int = 512) -> bytes:
    """The first ``n`` bytes of file ``p``; an unreadable or empty file is an :class:`XwinIOError`."""
    try:
        head = _head(p, n)
    except OSError as e:
        raise XwinIOError(f"cannot read {p}: {e}") from e
    if len(head) == 0:
        raise XwinIOError(f"empty file: {p}")
    return head
