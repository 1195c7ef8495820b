"""Projection geometry in vector form (one row per view), and scanner-style builders.

Every view ``n`` is described by world-space vectors in millimetres (NIfTI RAS+ world, see docs/architecture.md):

* ``center[n]``: the centre of the detector,
* ``u[n]``: one detector *column* step (from column c to c+1), its length is the pixel width,
* ``v[n]``: one detector *row* step (from row r to r+1), its length is the pixel height,
* ``source[n]`` (cone beam): the focal spot, or ``direction[n]`` (parallel beam): the ray direction.

Pixel ``(r, c)`` sits at ``center + (c - (cols-1)/2) * u + (r - (rows-1)/2) * v``. A cone-beam ray is the
segment source -> pixel; a parallel-beam ray is the whole line through the pixel along ``direction``.

Nothing below the builders (``circular_orbit``, ``xwin_pose``) knows about angles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from .errors import XwinError

__all__ = ["Geometry", "GeometryError", "circular_orbit", "xwin_pose", "euler_zxy"]

TensorLike = Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]], float]


class GeometryError(XwinError):
    """Raised for a geometry that cannot describe a projection (NaN, degenerate detector, ...)."""


def _as_vectors(x: TensorLike, name: str, n: Optional[int] = None) -> torch.Tensor:
    # a tensor keeps its autograd history: geometries built from poses that require grad are differentiable
    t = torch.as_tensor(x, dtype=torch.float64) if not isinstance(x, torch.Tensor) else x
    t = t.to(torch.float64)
    if t.ndim == 1:
        if t.shape[0] != 3:
            raise GeometryError(f"{name} must have shape (V, 3) or (3,), got {tuple(t.shape)}")
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[1] != 3:
        raise GeometryError(f"{name} must have shape (V, 3) or (3,), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise GeometryError(f"{name} contains NaN or Inf")
    return t


@dataclass(frozen=True)
class Geometry:
    """Per-view vector geometry. Build it with :meth:`cone`, :meth:`parallel` or a builder.

    All vectors are stored as float64 ``(V, 3)`` tensors on one device; ``.to(device)`` moves them. Tensors
    passed in keep their autograd history (a geometry built from a pose that requires grad is
    differentiable: :func:`xwin.kernels.project` back-propagates to its vectors).
    """

    kind: str
    center: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    rows: int
    cols: int
    source: Optional[torch.Tensor] = None
    direction: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def cone(cls, source: TensorLike, center: TensorLike, u: TensorLike, v: TensorLike, rows: int, cols: int) -> "Geometry":
        """Cone beam: rays run from ``source[n]`` to every pixel of detector ``n``."""
        return cls._build("cone", source, center, u, v, rows, cols)

    @classmethod
    def parallel(cls, direction: TensorLike, center: TensorLike, u: TensorLike, v: TensorLike, rows: int, cols: int) -> "Geometry":
        """Parallel beam: for every pixel, the whole line through it along ``direction[n]``."""
        return cls._build("parallel", direction, center, u, v, rows, cols)

    @classmethod
    def _build(cls, kind, first, center, u, v, rows, cols) -> "Geometry":
        if not (isinstance(rows, int) and isinstance(cols, int)) or isinstance(rows, bool) or isinstance(cols, bool):
            try:
                rows_i, cols_i = int(rows), int(cols)
            except Exception as exc:  # pragma: no cover - message below
                raise GeometryError(f"rows and cols must be integers, got {rows!r}, {cols!r}") from exc
            if rows_i != rows or cols_i != cols:
                raise GeometryError(f"rows and cols must be integers, got {rows!r}, {cols!r}")
            rows, cols = rows_i, cols_i
        if rows < 1 or cols < 1:
            raise GeometryError(f"detector must have at least one row and column, got rows={rows}, cols={cols}")
        name = "source" if kind == "cone" else "direction"
        vecs = [_as_vectors(first, name), _as_vectors(center, "center"), _as_vectors(u, "u"), _as_vectors(v, "v")]
        devices = {t.device for t in vecs}
        if len(devices) > 1:
            raise GeometryError(f"geometry vectors live on different devices: {sorted(map(str, devices))}")
        n = max(t.shape[0] for t in vecs)
        for t, nm in zip(vecs, [name, "center", "u", "v"]):
            if t.shape[0] not in (1, n):
                raise GeometryError(f"{nm} has {t.shape[0]} views but another vector has {n}")
        vecs = [t.expand(n, 3).contiguous() for t in vecs]
        first, center, u, v = vecs
        g = cls(kind=kind, center=center, u=u, v=v, rows=rows, cols=cols,
                source=first if kind == "cone" else None,
                direction=first if kind == "parallel" else None)
        g.validate()
        return g

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`GeometryError` when a view cannot form an image."""
        un = self.u.norm(dim=1)
        vn = self.v.norm(dim=1)
        if (un <= 0).any():
            raise GeometryError(f"detector vector u has zero length in view(s) {torch.nonzero(un <= 0).flatten().tolist()}")
        if (vn <= 0).any():
            raise GeometryError(f"detector vector v has zero length in view(s) {torch.nonzero(vn <= 0).flatten().tolist()}")
        normal = torch.cross(self.u, self.v, dim=1)
        nn = normal.norm(dim=1)
        bad = nn <= 1e-9 * un * vn
        if bad.any():
            raise GeometryError(f"detector vectors u and v are parallel in view(s) {torch.nonzero(bad).flatten().tolist()}")
        normal = normal / nn[:, None]
        if self.kind == "cone":
            dist = ((self.source - self.center) * normal).sum(1).abs()
            scale = torch.maximum(un, vn) * max(self.rows, self.cols)
            bad = dist <= 1e-9 * torch.clamp(scale, min=1.0)
            if bad.any():
                raise GeometryError(
                    f"the source lies on the detector plane in view(s) {torch.nonzero(bad).flatten().tolist()}")
        elif self.kind == "parallel":
            dn = self.direction.norm(dim=1)
            if (dn <= 0).any():
                raise GeometryError("parallel-beam direction has zero length")
            cosang = ((self.direction / dn[:, None]) * normal).sum(1).abs()
            if (cosang <= 1e-9).any():
                raise GeometryError("parallel-beam direction lies in the detector plane")
        else:
            raise GeometryError(f"unknown geometry kind {self.kind!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def num_views(self) -> int:
        return int(self.center.shape[0])

    @property
    def device(self) -> torch.device:
        return self.center.device

    @property
    def is_cone(self) -> bool:
        return self.kind == "cone"

    def to(self, device=None) -> "Geometry":
        """Move all vectors to ``device`` (they stay float64)."""
        mv = lambda t: None if t is None else t.to(device=device, dtype=torch.float64)
        return Geometry(self.kind, mv(self.center), mv(self.u), mv(self.v), self.rows, self.cols,
                        mv(self.source), mv(self.direction))

    def __getitem__(self, idx) -> "Geometry":
        """Select views: ``geometry[2:5]``, ``geometry[[0, 3]]``."""
        if isinstance(idx, int):
            idx = [idx]
        sel = lambda t: None if t is None else t[idx].reshape(-1, 3)
        return Geometry(self.kind, sel(self.center), sel(self.u), sel(self.v), self.rows, self.cols,
                        sel(self.source), sel(self.direction))

    def pixel_positions(self) -> torch.Tensor:
        """World position of every pixel, (V, rows, cols, 3) float64."""
        r = torch.arange(self.rows, dtype=torch.float64, device=self.device) - (self.rows - 1) / 2
        c = torch.arange(self.cols, dtype=torch.float64, device=self.device) - (self.cols - 1) / 2
        return (self.center[:, None, None, :] + c[None, None, :, None] * self.u[:, None, None, :]
                + r[None, :, None, None] * self.v[:, None, None, :])

    def as_dict(self) -> dict:
        """Plain-Python description (for metrics/JSON files)."""
        d = {"kind": self.kind, "rows": self.rows, "cols": self.cols,
             "center": self.center.cpu().tolist(), "u": self.u.cpu().tolist(), "v": self.v.cpu().tolist()}
        if self.source is not None:
            d["source"] = self.source.cpu().tolist()
        if self.direction is not None:
            d["direction"] = self.direction.cpu().tolist()
        return d

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.source, self.direction, self.center, self.u, self.v))

    def detach(self) -> "Geometry":
        """The same geometry without autograd history."""
        dt = lambda t: None if t is None else t.detach()
        return Geometry(self.kind, dt(self.center), dt(self.u), dt(self.v), self.rows, self.cols, dt(self.source),
                        dt(self.direction))

    def to_json(self) -> str:
        """The geometry as JSON text in xwin's schema (docs/architecture.md): ``{"type": "cone"|"parallel", "rows", "cols",
        "source"|"direction", "center", "u", "v"}``, one 3-vector per view, world mm."""
        first = "source" if self.kind == "cone" else "direction"
        vec = lambda t: t.detach().cpu().tolist()
        d = {"type": self.kind, "rows": self.rows, "cols": self.cols,
             first: vec(self.source if self.kind == "cone" else self.direction),
             "center": vec(self.center), "u": vec(self.u), "v": vec(self.v)}
        return json.dumps(d)

    @classmethod
    def from_json(cls, obj: Union[str, dict, "os.PathLike"]) -> "Geometry":
        """A geometry from JSON text, a parsed dict or a path to a JSON file, in the schema of :meth:`to_json`
        (also under a ``"geometry"`` key, as results files hold it; ``"kind"`` is accepted for ``"type"``)."""
        if isinstance(obj, os.PathLike) or (isinstance(obj, str) and not obj.lstrip().startswith("{")):
            try:
                obj = Path(obj).read_text()
            except OSError as exc:
                raise GeometryError(f"cannot read geometry JSON {str(obj)!r}: {exc.strerror or exc}") from None
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as exc:
                raise GeometryError(f"geometry JSON is not valid JSON: {exc}") from None
        d = obj
        if isinstance(d, dict) and isinstance(d.get("geometry"), dict):
            d = d["geometry"]
        if not isinstance(d, dict):
            raise GeometryError("geometry JSON must be an object")
        kind = d.get("type", d.get("kind"))
        if kind not in ("cone", "parallel"):
            raise GeometryError(f'geometry JSON: "type" must be "cone" or "parallel", got {kind!r}')
        first = "source" if kind == "cone" else "direction"
        missing = [k for k in ("rows", "cols", first, "center", "u", "v") if k not in d]
        if missing:
            raise GeometryError(f"geometry JSON ({kind}) lacks {', '.join(missing)}")
        try:
            rows, cols = int(d["rows"]), int(d["cols"])
        except (TypeError, ValueError):
            raise GeometryError(f"geometry JSON: rows/cols must be integers, got {d['rows']!r}, {d['cols']!r}") from None
        try:
            return cls._build(kind, d[first], d["center"], d["u"], d["v"], rows, cols)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, GeometryError):
                raise
            raise GeometryError(f"geometry JSON: vectors must be lists of 3 numbers per view ({exc})") from None

    def __repr__(self) -> str:
        return f"Geometry(kind={self.kind!r}, views={self.num_views}, rows={self.rows}, cols={self.cols})"


# ---------------------------------------------------------------------- builders

def _angles(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def circular_orbit(angles, *, rows: int, cols: int, pixel_size=1.0, sid: float = 1000.0, sdd: float = 1500.0,
                   kind: str = "cone", det_offset=(0.0, 0.0), isocenter=(0.0, 0.0, 0.0)) -> Geometry:
    """A circular orbit about the world z axis (the patient's long axis in RAS+), like a CT gantry.

    ``angles`` in **radians**. At angle θ the source sits at ``isocenter + sid·(cos θ, sin θ, 0)`` and the
    detector centre at ``isocenter − (sdd − sid)·(cos θ, sin θ, 0)``; columns step along
    ``(−sin θ, cos θ, 0)`` and rows step along −z (row 0 is the superior edge). ``pixel_size`` is a number or
    (row height, column width) in mm; ``det_offset`` = (column, row) shift of the detector centre in mm.
    For ``kind="parallel"`` rays run along ``−(cos θ, sin θ, 0)`` and the detector is centred on the
    isocentre (sid and sdd are not used).
    """
    th = _angles(angles)
    if sid <= 0 or (kind == "cone" and sdd <= sid):
        raise GeometryError(f"need 0 < sid < sdd for a cone-beam orbit, got sid={sid}, sdd={sdd}")
    ps = torch.as_tensor(pixel_size, dtype=torch.float64).reshape(-1)
    ph, pw = (float(ps[0]), float(ps[0])) if ps.numel() == 1 else (float(ps[0]), float(ps[1]))
    iso = torch.as_tensor(isocenter, dtype=torch.float64).reshape(1, 3)
    radial = torch.stack([th.cos(), th.sin(), torch.zeros_like(th)], 1)
    tangential = torch.stack([-th.sin(), th.cos(), torch.zeros_like(th)], 1)
    zdown = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64).expand_as(radial)
    u = tangential * pw
    v = zdown * ph
    off = tangential * float(det_offset[0]) + zdown * float(det_offset[1])
    if kind == "cone":
        center = iso - (sdd - sid) * radial + off
        return Geometry.cone(iso + sid * radial, center, u, v, rows, cols)
    if kind == "parallel":
        return Geometry.parallel(-radial, iso + off, u, v, rows, cols)
    raise GeometryError(f"kind must be 'cone' or 'parallel', got {kind!r}")


def euler_zxy(yaw, pitch, roll) -> torch.Tensor:
    """Rotation matrices R = Rz(yaw) · Rx(pitch) · Ry(roll), angles in degrees, shape (V, 3, 3)."""
    y, p, r = torch.broadcast_tensors(*(torch.as_tensor(a, dtype=torch.float64).reshape(-1) for a in (yaw, pitch, roll)))
    y, p, r = (torch.deg2rad(a) for a in (y, p, r))
    o, z = torch.ones_like(y), torch.zeros_like(y)
    rz = torch.stack([torch.stack([y.cos(), -y.sin(), z], -1), torch.stack([y.sin(), y.cos(), z], -1),
                      torch.stack([z, z, o], -1)], -2)
    rx = torch.stack([torch.stack([o, z, z], -1), torch.stack([z, p.cos(), -p.sin()], -1),
                      torch.stack([z, p.sin(), p.cos()], -1)], -2)
    ry = torch.stack([torch.stack([r.cos(), z, r.sin()], -1), torch.stack([z, o, z], -1),
                      torch.stack([-r.sin(), z, r.cos()], -1)], -2)
    return rz @ rx @ ry


def xwin_pose(yaw=0.0, pitch=0.0, roll=0.0, *, size: int = 512, pixel_size: Optional[float] = None,
              sdd: float = 1020.0, sid: float = 700.0, isocenter=(0.0, 0.0, 0.0)) -> Geometry:
    """The X-WIN rendering setup: cone beam, sdd 1020 mm, source 700 mm from the isocentre, square detector.

    The official X-WIN DRRs use a 512×512 detector of 1.0 mm pixels; for another ``size`` the default pixel
    size is ``512 / size`` mm so the field of view stays 512 mm wide.

    Pose (angles in **degrees**; scalars or (V,) tensors, broadcast together): at yaw = pitch = roll = 0 the
    view is a posterior–anterior chest radiograph: the source is posterior (world −y in RAS+), the detector
    anterior, image columns run from the patient's right to left (world −x) and rows from head to feet
    (world −z), i.e. the image is displayed as a PA film. The whole source–detector frame is then rotated
    about the isocentre by R = Rz(yaw)·Rx(pitch)·Ry(roll) (Euler "ZXY"), all right-handed about world axes:

    * **yaw** turns about the long (superior, +z) axis: positive yaw moves the source towards the patient's
      right (+x); yaw = ±90 gives lateral views. X-WIN's actions are yaws in [−90°, 90°].
    * **pitch** turns about the left–right (+x) axis: positive pitch moves the (posterior) source towards
      the feet (−z) and the detector towards the head, so the beam travels upwards through the chest.
    * **roll** turns about the antero-posterior (+y) axis: it spins the detector in its own plane.
    """
    if size < 1:
        raise GeometryError(f"size must be positive, got {size}")
    if pixel_size is None:
        pixel_size = 512.0 / size
    rot = euler_zxy(yaw, pitch, roll)
    iso = torch.as_tensor(isocenter, dtype=torch.float64).reshape(1, 3)
    src0 = torch.tensor([0.0, -sid, 0.0], dtype=torch.float64)
    det0 = torch.tensor([0.0, sdd - sid, 0.0], dtype=torch.float64)
    u0 = torch.tensor([-pixel_size, 0.0, 0.0], dtype=torch.float64)
    v0 = torch.tensor([0.0, 0.0, -pixel_size], dtype=torch.float64)
    return Geometry.cone(iso + rot @ src0, iso + rot @ det0, rot @ u0, rot @ v0, size, size)
