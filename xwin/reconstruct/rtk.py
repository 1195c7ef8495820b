"""RTK geometry (``ThreeDCircularProjectionGeometry`` XML) <-> xwin's vector geometry, and xwin's geometry JSON.

RTK's conventions, as its documentation (``documentation/docs/Geometry.md``) and
``rtkThreeDCircularProjectionGeometry.cxx`` define them; every one is implemented here:

* Per projection, nine parameters: ``SourceToIsocenterDistance`` (SID), ``SourceToDetectorDistance`` (SDD;
  0 means parallel beam), ``GantryAngle`` θ, ``OutOfPlaneAngle`` φ, ``InPlaneAngle`` ψ (degrees in the file),
  ``SourceOffsetX/Y`` and ``ProjectionOffsetX/Y`` (mm). A value given outside ``<Projection>`` holds for every
  projection that follows (RTK's writer puts constant parameters there); unset ones are 0.
* Rotation (world -> rotated detector frame): ``M_R = Rz(-ψ) · Rx(-φ) · Ry(-θ)`` with the right-handed
  elementary rotations; so a point given in the rotated frame sits at ``M_R^T · point`` in the world.
* In the rotated frame the source is at ``(SourceOffsetX, SourceOffsetY, SID)`` and the detector point whose
  2-D detector coordinates are ``(x, y)`` sits at ``(x + ProjectionOffsetX, y + ProjectionOffsetY, SID − SDD)``;
  the detector is the plane z = SID − SDD, its normal the rotated z. Parallel beam (SDD = 0): the rays run
  along the rotated −z through every detector point.
* Detector coordinates of a pixel come from the projection stack: ITK index (column i, row j, view k)
  -> ``origin + direction · (spacing ⊙ (i, j, k))``; its first two components are (x, y) (RTK ignores the
  third). So the stack's origin, spacing and direction matter as much as the XML.
* The world is RTK's fixed frame: the physical space of the ITK volume, which is LPS (DICOM/ITK). xwin's
  world is the NIfTI RAS+ frame of the volume's affine: x and y change sign (:data:`LPS_TO_RAS`).
* The projection matrix RTK stores in the file (``<Matrix>``, 3 × 4, world LPS -> detector (x·w, y·w, w))
  is ``[[1, 0, sx − px], [0, 1, sy − py], [0, 0, 1]] · [[−SDD, 0, 0, 0], [0, −SDD, 0, 0], [0, 0, 1, −SID]] ·
  T(−sx, −sy, 0) · M_R`` (parallel: the middle factor is ``[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]``);
  :func:`read_rtk_geometry` recomputes it from the parameters and refuses a file whose matrices disagree
  (by more than 1e-3, RTK's own tolerance), which catches a misread file.

:func:`load_geometry` reads either an RTK XML file or xwin's geometry JSON (``Geometry.from_json``, the schema
of docs/architecture.md: type, rows, cols, source|direction, center, u, v in world mm of the volume's RAS+ frame).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from xwin.errors import XwinError
from xwin.geometry import Geometry, GeometryError
from xwin.io import XwinIOError
from xwin.io.projections import LPS_TO_RAS

__all__ = ["RTKGeometry", "PARAM_ORDER", "read_rtk_geometry", "write_rtk_geometry", "rtk_rotations", "rtk_matrices",
           "rtk_to_vector", "load_geometry", "centered_detector_frame"]

_PARAMS = {  # XML element -> field
    "SourceToIsocenterDistance": "sid", "SourceToDetectorDistance": "sdd", "GantryAngle": "gantry",
    "ProjectionOffsetX": "proj_offset_x", "ProjectionOffsetY": "proj_offset_y", "OutOfPlaneAngle": "out_of_plane",
    "InPlaneAngle": "in_plane", "SourceOffsetX": "source_offset_x", "SourceOffsetY": "source_offset_y",
}


#: the order of RTK's ``AddProjection(sid, sdd, gantry, projOffsetX, projOffsetY, outOfPlane, inPlane, sourceOffsetX,
#: sourceOffsetY)`` arguments
PARAM_ORDER = ("sid", "sdd", "gantry", "proj_offset_x", "proj_offset_y", "out_of_plane", "in_plane",
               "source_offset_x", "source_offset_y")


@dataclass
class RTKGeometry:
    """RTK's nine parameters per projection, as (V,) float64 arrays; angles in degrees (as in the file)."""

    sid: np.ndarray
    sdd: np.ndarray
    gantry: np.ndarray
    proj_offset_x: np.ndarray = None
    proj_offset_y: np.ndarray = None
    out_of_plane: np.ndarray = None
    in_plane: np.ndarray = None
    source_offset_x: np.ndarray = None
    source_offset_y: np.ndarray = None
    matrices: Optional[np.ndarray] = field(default=None, repr=False)   # (V, 3, 4) as read from a file

    def __post_init__(self):
        n = np.broadcast_shapes(*(np.shape(getattr(self, f)) for f in _PARAMS.values() if getattr(self, f) is not None))
        n = int(np.prod(n)) if n else 1
        for f in _PARAMS.values():
            val = getattr(self, f)
            arr = np.zeros(n) if val is None else np.broadcast_to(np.asarray(val, dtype=np.float64).reshape(-1), (n,))
            if not np.all(np.isfinite(arr)):
                raise GeometryError(f"RTK geometry: {f} contains NaN or Inf")
            setattr(self, f, np.array(arr, dtype=np.float64))
        if n == 0:
            raise GeometryError("RTK geometry has no projections")
        par = self.sdd == 0
        if par.any() and not par.all():
            raise GeometryError("RTK geometry mixes parallel (SourceToDetectorDistance 0) and cone-beam projections")

    @property
    def num_views(self) -> int:
        return int(self.sid.shape[0])

    @property
    def parallel(self) -> bool:
        return bool(self.sdd[0] == 0)


def _rot(axis: str, a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    rows = {"x": [[o, z, z], [z, c, -s], [z, s, c]],
            "y": [[c, z, s], [z, o, z], [-s, z, c]],
            "z": [[c, -s, z], [s, c, z], [z, z, o]]}[axis]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def rtk_rotations(g: RTKGeometry) -> np.ndarray:
    """(V, 3, 3) ``M_R = Rz(−ψ)·Rx(−φ)·Ry(−θ)``: world (RTK fixed frame) -> rotated detector frame."""
    th, ph, ps = (np.radians(a) for a in (g.gantry, g.out_of_plane, g.in_plane))
    return _rot("z", -ps) @ _rot("x", -ph) @ _rot("y", -th)


def rtk_matrices(g: RTKGeometry) -> np.ndarray:
    """(V, 3, 4) projection matrices exactly as RTK builds them (world LPS -> detector (x·w, y·w, w))."""
    V = g.num_views
    R = np.zeros((V, 4, 4))
    R[:, :3, :3] = rtk_rotations(g)
    R[:, 3, 3] = 1
    T = np.tile(np.eye(4), (V, 1, 1))
    T[:, 0, 3] = -g.source_offset_x
    T[:, 1, 3] = -g.source_offset_y
    mag = np.zeros((V, 3, 4))
    if g.parallel:
        mag[:, 0, 0] = mag[:, 1, 1] = mag[:, 2, 3] = 1
    else:
        mag[:, 0, 0] = mag[:, 1, 1] = -g.sdd
        mag[:, 2, 2] = 1
        mag[:, 2, 3] = -g.sid
    P = np.tile(np.eye(3), (V, 1, 1))
    P[:, 0, 2] = g.source_offset_x - g.proj_offset_x
    P[:, 1, 2] = g.source_offset_y - g.proj_offset_y
    return P @ mag @ T @ R


def centered_detector_frame(rows: int, cols: int, pixel_size) -> np.ndarray:
    """The (4, 4) ITK index -> detector-coordinate matrix of a stack without one (.npy): identity direction,
    spacing ``pixel_size`` (a number or (row height, column width)), detector coordinate (0, 0) at the centre."""
    ps = np.asarray(pixel_size, dtype=np.float64).reshape(-1)
    ph, pw = (float(ps[0]), float(ps[0])) if ps.size == 1 else (float(ps[0]), float(ps[1]))
    m = np.eye(4)
    m[0, 0], m[1, 1] = pw, ph
    m[0, 3], m[1, 3] = -pw * (cols - 1) / 2, -ph * (rows - 1) / 2
    return m


def rtk_to_vector(g: RTKGeometry, index_to_physical: np.ndarray, rows: int, cols: int, *,
                  world: str = "ras") -> Geometry:
    """xwin's vector :class:`Geometry` of an RTK geometry and its projection stack's detector frame.

    ``index_to_physical``: (4, 4) ITK index (column, row, view, 1) -> detector coordinates (the stack's
    origin, spacing, direction; :class:`xwin.io.ProjectionStack` has it). ``world``: "ras" (xwin, NIfTI:
    x and y of RTK's LPS negated) or "lps" (RTK's own frame).
    """
    m = np.asarray(index_to_physical, dtype=np.float64)
    if m.shape != (4, 4):
        raise GeometryError(f"the detector frame must be a 4x4 matrix, got shape {m.shape}")
    V = g.num_views
    Minv = np.transpose(rtk_rotations(g), (0, 2, 1))                   # rotated frame -> world
    k = np.arange(V, dtype=np.float64)
    mid = m[:3, 0] * (cols - 1) / 2 + m[:3, 1] * (rows - 1) / 2 + m[:3, 3]
    det_xy = mid[None, :2] + k[:, None] * m[None, :2, 2]                # detector coords of each view's centre
    z_det = -g.sid if g.parallel else g.sid - g.sdd
    local_c = np.stack([det_xy[:, 0] + g.proj_offset_x, det_xy[:, 1] + g.proj_offset_y, z_det], -1)
    local_u = np.broadcast_to(np.array([m[0, 0], m[1, 0], 0.0]), (V, 3))
    local_v = np.broadcast_to(np.array([m[0, 1], m[1, 1], 0.0]), (V, 3))
    if np.linalg.norm(local_u[0]) == 0 or np.linalg.norm(local_v[0]) == 0 or \
            abs(local_u[0, 0] * local_v[0, 1] - local_u[0, 1] * local_v[0, 0]) < 1e-12:
        raise GeometryError("the projection stack's spacing/direction give a degenerate detector (its first two "
                            "axes are parallel or of zero length in the detector plane)")
    rot = lambda a: np.einsum("vij,vj->vi", Minv, a)  # noqa: E731
    center, u, v = rot(local_c), rot(local_u), rot(local_v)
    flip = LPS_TO_RAS[:3, :3] if world == "ras" else np.eye(3)
    if world not in ("ras", "lps"):
        raise GeometryError(f"world must be 'ras' or 'lps', got {world!r}")
    center, u, v = center @ flip, u @ flip, v @ flip
    if g.parallel:
        d = rot(np.broadcast_to(np.array([0.0, 0.0, -1.0]), (V, 3))) @ flip
        return Geometry.parallel(d, center, u, v, rows, cols)
    src = rot(np.stack([g.source_offset_x, g.source_offset_y, g.sid], -1)) @ flip
    return Geometry.cone(src, center, u, v, rows, cols)


# ---------------------------------------------------------------------------------------- XML

def read_rtk_geometry(path: Union[str, Path], *, check_matrices: bool = True) -> RTKGeometry:
    """Parse an RTK ``ThreeDCircularProjectionGeometry`` XML file (versions 2 and 3).

    With ``check_matrices`` the ``<Matrix>`` of every projection (when present) must equal the matrix
    recomputed from the parameters within 1e-3, as RTK's own reader requires.
    """
    p = Path(path)
    if not p.exists():
        raise XwinIOError(f"cannot read geometry {str(p)!r}: no such file")
    try:
        root = ET.parse(p).getroot()
    except (ET.ParseError, OSError) as e:
        raise XwinIOError(f"not an RTK geometry XML file: {p}: {e}") from e
    if root.tag != "RTKThreeDCircularGeometry":
        raise XwinIOError(f"not an RTK geometry file: {p} has root element <{root.tag}>, expected "
                          "<RTKThreeDCircularGeometry>")
    if root.get("version") not in (None, "2", "3"):
        raise XwinIOError(f"RTK geometry {p}: unsupported version {root.get('version')!r} (2 or 3 are read)")
    if root.find("RadiusCylindricalDetector") is not None and float(root.find("RadiusCylindricalDetector").text):
        raise XwinIOError(f"RTK geometry {p}: cylindrical detectors (RadiusCylindricalDetector) are not supported")
    state = {f: 0.0 for f in _PARAMS.values()}
    cols = {f: [] for f in _PARAMS.values()}
    mats = []

    def take(elem):
        for child in elem:
            tag = "GantryAngle" if child.tag == "Angle" else child.tag
            if tag in _PARAMS:
                try:
                    state[_PARAMS[tag]] = float(child.text)
                except (TypeError, ValueError) as e:
                    raise XwinIOError(f"RTK geometry {p}: <{child.tag}> is not a number: {child.text!r}") from e

    take(root)
    for proj in root.iter("Projection"):
        take(proj)
        for f in cols:
            cols[f].append(state[f])
        mel = proj.find("Matrix")
        if mel is not None and mel.text and mel.text.split():
            try:
                mats.append((len(cols["sid"]) - 1,
                             np.asarray([float(x) for x in mel.text.split()], dtype=np.float64).reshape(3, 4)))
            except ValueError as e:
                raise XwinIOError(f"RTK geometry {p}: a <Matrix> is not 12 numbers") from e
    if not cols["sid"]:
        raise XwinIOError(f"RTK geometry {p} has no <Projection>")
    try:
        g = RTKGeometry(**{f: np.asarray(v) for f, v in cols.items()},
                        matrices=np.stack([m for _, m in mats]) if len(mats) == len(cols["sid"]) else None)
    except GeometryError as e:
        raise XwinIOError(f"RTK geometry {p}: {e}") from e
    if check_matrices and mats:
        idx = [i for i, _ in mats]
        err = np.abs(np.stack([m for _, m in mats]) - rtk_matrices(g)[idx]).max(axis=(1, 2))
        if err.max() > 1e-3:
            j = int(err.argmax())
            raise XwinIOError(f"RTK geometry {p}: the <Matrix> of projection {idx[j]} disagrees with its parameters "
                              f"(max difference {err[j]:.3g})")
    return g


def write_rtk_geometry(g: RTKGeometry, path: Union[str, Path]) -> None:
    """Write ``g`` as RTK's XML (version 3): every parameter per projection, and its matrix."""
    mats = rtk_matrices(g)
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE RTKGEOMETRY>", '<RTKThreeDCircularGeometry version="3">']
    for i in range(g.num_views):
        lines.append("  <Projection>")
        for tag, f in _PARAMS.items():
            lines.append(f"    <{tag}>{float(getattr(g, f)[i])!r}</{tag}>")
        rows = "\n".join("      " + " ".join(repr(float(x)) for x in r) for r in mats[i])
        lines.append(f"    <Matrix>\n{rows}\n    </Matrix>")
        lines.append("  </Projection>")
    lines.append("</RTKThreeDCircularGeometry>")
    Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- files

def load_geometry(path: Union[str, Path], *, rows: int, cols: int, index_to_physical: Optional[np.ndarray] = None,
                  pixel_size=None) -> tuple:
    """``(Geometry, description)`` from an RTK XML or an xwin JSON file, for a stack of ``rows`` × ``cols``.

    RTK needs the stack's detector frame (``index_to_physical``) or, for a stack without one (.npy), the
    ``pixel_size`` (detector coordinate 0 at the stack's centre). The result is checked against the stack.
    """
    p = Path(path)
    if not p.exists():
        raise XwinIOError(f"cannot read geometry {str(p)!r}: no such file")
    try:
        head = p.read_bytes()[:4096].lstrip()
    except OSError as e:
        raise XwinIOError(f"cannot read geometry {str(p)!r}: {e}") from e
    if head.startswith(b"<"):
        rg = read_rtk_geometry(p)
        frame = index_to_physical
        if frame is None:
            if pixel_size is None:
                raise XwinError("an RTK geometry with a .npy stack needs the detector pixel size (--pixel-size): "
                                ".npy holds no origin/spacing")
            frame = centered_detector_frame(rows, cols, pixel_size)
        g = rtk_to_vector(rg, frame, rows, cols)
        desc = {"format": "rtk-xml", "path": str(p), "views": rg.num_views, "parallel": rg.parallel,
                "sid_mm": _const(rg.sid), "sdd_mm": _const(rg.sdd),
                "gantry_deg": [float(a) for a in rg.gantry],
                "detector_frame": np.asarray(frame).tolist(), "world": "RAS (RTK's LPS with x and y negated)"}
        for f in ("proj_offset_x", "proj_offset_y", "out_of_plane", "in_plane", "source_offset_x", "source_offset_y"):
            desc[f] = _const(getattr(rg, f))
    else:
        try:
            g = Geometry.from_json(p.read_text())
        except UnicodeDecodeError as e:
            raise XwinIOError(f"geometry {str(p)!r} is neither RTK XML nor JSON: {e}") from e
        desc = {"format": "xwin-json", "path": str(p), "views": g.num_views}
    if (g.rows, g.cols) != (rows, cols):
        raise XwinError(f"geometry {p.name} describes a {g.rows}x{g.cols} detector, the projections are "
                        f"{rows}x{cols} (rows x cols)")
    return g, desc


def _const(a: np.ndarray):
    """A constant array as one number, else the list."""
    return float(a[0]) if np.all(a == a[0]) else [float(x) for x in a]
