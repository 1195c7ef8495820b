"""ITK MetaImage (``.mha`` with the data after the header, ``.mhd`` + a separate data file): a small reader and
writer, enough for RTK's projection stacks and volumes.

Why our own and not ITK: a MetaImage header is a few ``Key = value`` lines (documented in ITK's MetaIO), and
the only other way to read one in Python is ITK/SimpleITK (hundreds of MB of wheels, ~45 s to import on this
machine). The reader handles what ITK writes: ``NDims`` 2-4, ``DimSize``, ``ElementType`` (MET_UCHAR ...
MET_DOUBLE), ``ElementSpacing``/``ElementSize``, ``Offset``/``Origin``/``Position``,
``TransformMatrix``/``Rotation``/``Orientation`` (stored column by column: the direction matrix's columns
are the image axes), ``BinaryDataByteOrderMSB``/``ElementByteOrderMSB``, ``CompressedData`` (zlib),
``HeaderSize`` and ``ElementDataFile`` = ``LOCAL`` or a file name. Not handled (an error that says so):
multi-channel images, ``LIST`` / pattern data files (one file per slice).

:func:`read_metaimage` returns a :class:`MetaImage`: ``array`` in numpy's C order ``[k, j, i]`` (ITK's
``GetArrayFromImage`` order: the last ITK axis first) and ``origin``, ``spacing``, ``direction`` in ITK's
sense (physical = origin + direction @ (spacing * index), index in ITK order ``(i, j, k)``; for a volume
that physical space is LPS).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._common import PathLike, XwinIOError, _check_exists

__all__ = ["MetaImage", "read_metaimage", "write_metaimage"]

_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16, "MET_USHORT": np.uint16,
    "MET_INT": np.int32, "MET_UINT": np.uint32, "MET_LONG": np.int32, "MET_ULONG": np.uint32,
    "MET_LONG_LONG": np.int64, "MET_ULONG_LONG": np.uint64, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}
_NAMES = {np.dtype(v).newbyteorder("<"): k for k, v in reversed(list(_TYPES.items()))}
_MAX_HEADER = 1 << 16


@dataclass
class MetaImage:
    """A MetaImage: ``array`` indexed ``[k, j, i]`` (ITK axes reversed), and its ITK geometry."""

    array: np.ndarray
    origin: np.ndarray      # (N,) physical position of index 0
    spacing: np.ndarray     # (N,)
    direction: np.ndarray   # (N, N): column d is the physical direction of ITK axis d

    @property
    def size(self) -> tuple:
        """ITK's size (i, j, k, ...): the array's shape reversed."""
        return tuple(reversed(self.array.shape))

    def index_to_physical(self) -> np.ndarray:
        """(N+1, N+1) homogeneous matrix: ITK index (i, j, k, 1) -> physical point."""
        n = len(self.origin)
        m = np.eye(n + 1)
        m[:n, :n] = self.direction @ np.diag(self.spacing)
        m[:n, n] = self.origin
        return m


def _parse_header(p: Path):
    with open(p, "rb") as f:
        raw = f.read(_MAX_HEADER)
    fields, offset = {}, 0
    for line in raw.split(b"\n"):
        offset += len(line) + 1
        text = line.decode("latin-1").strip()
        if not text:
            continue
        if "=" not in text:
            raise XwinIOError(f"not a MetaImage header: {p}: line {text[:60]!r} has no '='")
        key, val = (s.strip() for s in text.split("=", 1))
        fields[key] = val
        if key == "ElementDataFile":
            return fields, offset
    raise XwinIOError(f"not a MetaImage file: {p} has no ElementDataFile line in its first {_MAX_HEADER} bytes")


def _numbers(fields, key, n, default, p):
    if key not in fields:
        return np.asarray(default, dtype=np.float64)
    try:
        vals = np.asarray([float(x) for x in fields[key].split()], dtype=np.float64)
    except ValueError as e:
        raise XwinIOError(f"bad {key} in MetaImage {p}: {fields[key]!r}") from e
    if vals.size != n:
        raise XwinIOError(f"bad {key} in MetaImage {p}: expected {n} numbers, got {vals.size}")
    return vals


def read_metaimage(path: PathLike) -> MetaImage:
    """Read a ``.mha`` / ``.mhd`` file (see the module notes); :class:`XwinIOError` for anything unreadable."""
    p = _check_exists(path)
    f, data_offset = _parse_header(p)
    try:
        nd = int(f.get("NDims", "0"))
        size = [int(x) for x in f.get("DimSize", "").split()]
    except ValueError as e:
        raise XwinIOError(f"bad NDims/DimSize in MetaImage {p}") from e
    if nd < 1 or len(size) != nd or min(size) < 1:
        raise XwinIOError(f"bad NDims/DimSize in MetaImage {p}: NDims {f.get('NDims')!r}, DimSize {f.get('DimSize')!r}")
    if int(f.get("ElementNumberOfChannels", "1")) != 1:
        raise XwinIOError(f"multi-channel MetaImage {p} is not supported (ElementNumberOfChannels "
                          f"{f['ElementNumberOfChannels']})")
    etype = f.get("ElementType", "")
    if etype not in _TYPES:
        raise XwinIOError(f"unsupported ElementType {etype!r} in MetaImage {p} (supported: {', '.join(_TYPES)})")
    msb = (f.get("BinaryDataByteOrderMSB", f.get("ElementByteOrderMSB", "False")).lower() == "true")
    dtype = np.dtype(_TYPES[etype]).newbyteorder(">" if msb else "<")
    spacing = _numbers(f, "ElementSpacing", nd, _numbers(f, "ElementSize", nd, np.ones(nd), p), p)
    origin = np.zeros(nd)
    for key in ("Offset", "Origin", "Position"):
        if key in f:
            origin = _numbers(f, key, nd, origin, p)
            break
    direction = np.eye(nd)
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        if key in f:
            direction = _numbers(f, key, nd * nd, None, p).reshape(nd, nd).T   # stored column by column
            break
    count = int(np.prod(size))
    nbytes = count * dtype.itemsize
    datafile = f["ElementDataFile"]
    if datafile.upper() == "LOCAL":
        src, start = p, data_offset
    elif datafile.upper().startswith("LIST") or "%" in datafile:
        raise XwinIOError(f"MetaImage {p}: ElementDataFile {datafile!r} (one file per slice) is not supported")
    else:
        src = p.parent / datafile
        if not src.exists():
            raise XwinIOError(f"MetaImage {p}: its data file {src} does not exist")
        start = 0
    hs = int(f.get("HeaderSize", "0"))
    if hs > 0:
        start += hs
    compressed = f.get("CompressedData", "False").lower() == "true"
    try:
        with open(src, "rb") as fh:
            fh.seek(start)
            if hs == -1 and not compressed:          # data at the end of the file
                fh.seek(-nbytes, 2)
            raw = fh.read()
    except OSError as e:
        raise XwinIOError(f"cannot read the data of MetaImage {p}: {e}") from e
    if compressed:
        try:
            raw = zlib.decompress(raw)
        except zlib.error as e:
            raise XwinIOError(f"corrupt compressed data in MetaImage {p}: {e}") from e
    if len(raw) < nbytes:
        raise XwinIOError(f"truncated MetaImage {p}: {len(raw)} bytes of data, {nbytes} needed for {size} "
                          f"{etype}")
    arr = np.frombuffer(raw[:nbytes], dtype=dtype).reshape(tuple(reversed(size)))
    return MetaImage(arr.astype(dtype.newbyteorder("="), copy=True), origin, spacing, direction)


def write_metaimage(path: PathLike, array: np.ndarray, *, origin=None, spacing=None, direction=None,
                    compress: bool = False) -> None:
    """Write ``array`` (indexed ``[k, j, i]``) as ``.mha`` (header + data in one file) or ``.mhd`` + ``.raw``."""
    p = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype.newbyteorder("<") not in _NAMES:
        raise XwinIOError(f"write_metaimage: unsupported dtype {arr.dtype}")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    nd = arr.ndim
    origin = np.zeros(nd) if origin is None else np.asarray(origin, dtype=np.float64)
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=np.float64)
    direction = np.eye(nd) if direction is None else np.asarray(direction, dtype=np.float64)
    data = arr.tobytes()
    if compress:
        data = zlib.compress(data)
    fmt = lambda a: " ".join(repr(float(x)) for x in np.ravel(a))  # noqa: E731
    local = p.suffix.lower() == ".mha"
    raw_name = p.with_suffix(".zraw" if compress else ".raw").name
    header = [
        "ObjectType = Image", f"NDims = {nd}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compress}", f"TransformMatrix = {fmt(direction.T)}", f"Offset = {fmt(origin)}",
        "CenterOfRotation = " + " ".join("0" for _ in range(nd)), f"ElementSpacing = {fmt(spacing)}",
        "DimSize = " + " ".join(str(s) for s in reversed(arr.shape)),
        f"ElementType = {_NAMES[arr.dtype]}", f"ElementDataFile = {'LOCAL' if local else raw_name}",
    ]
    if compress:
        header.insert(5, f"CompressedDataSize = {len(data)}")
    text = ("\n".join(header) + "\n").encode("latin-1")
    p.parent.mkdir(parents=True, exist_ok=True)
    if local:
        p.write_bytes(text + data)
    else:
        p.write_bytes(text)
        (p.parent / raw_name).write_bytes(data)
