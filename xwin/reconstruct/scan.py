"""Simulating a CT scan: load a CT, downsample it, lay out a circular scan about it, project it, add noise.

Library functions with explicit parameters (the command-line tool, :mod:`xwin.reconstruct.__main__`, only
parses options and calls these). Bad parameters raise :class:`ScanError` (an
:class:`~xwin.errors.XwinError`); unreadable inputs raise :class:`xwin.io.XwinIOError`.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from xwin.errors import XwinError
from xwin.geometry import Geometry, circular_orbit
from xwin.io import Volume, XwinIOError

__all__ = ["ScanError", "load_ct", "downsample", "scan_geometry", "simulate", "add_noise"]


class ScanError(XwinError):
    """A scan that cannot be simulated as asked (inconsistent distances, a downsampling larger than the CT)."""


def load_ct(path: Optional[str]) -> Tuple[Volume, str]:
    """``(volume in HU, description)``: the embedded sample chest CT when ``path`` is None.

    Any reader error, a CT that is not one 3-D volume, too small or not finite is an :class:`XwinIOError`
    whose message starts with "cannot read CT" or names the CT.
    """
    from xwin.io import load_volume

    if path is None:
        from xwin.data import sample_ct
        return sample_ct(), "embedded sample chest CT"
    if not os.path.exists(path):
        raise XwinIOError(f"cannot read CT {path!r}: no such file or folder")
    try:
        vol = load_volume(path)
    except Exception as exc:  # any reader error becomes one clear line
        raise XwinIOError(f"cannot read CT {path!r}: {exc}") from exc
    if vol.data.dim() != 3:
        raise XwinIOError(f"CT {path!r} must be one 3-D volume, got shape {tuple(vol.data.shape)}")
    if min(vol.data.shape) < 2:
        raise XwinIOError(f"CT {path!r} is too small to reconstruct: shape {tuple(vol.data.shape)}")
    if not bool(vol.data.isfinite().all()):
        raise XwinIOError(f"CT {path!r} contains NaN or Inf values")
    return vol, path


def downsample(vol: Volume, factor: int) -> Volume:
    """Integer block averaging (keeps the world frame: the new voxel centres are the block centres)."""
    import torch.nn.functional as F

    if factor == 1:
        return vol
    if min(vol.data.shape) < factor:
        raise ScanError(f"--downsample {factor} is larger than the CT's smallest dimension {tuple(vol.data.shape)}")
    data = F.avg_pool3d(vol.data.float()[None, None], factor)[0, 0]
    aff = np.array(vol.affine, dtype=np.float64).copy()
    aff[:3, 3] = vol.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + vol.affine[:3, 3]
    aff[:3, :3] = vol.affine[:3, :3] * factor
    return Volume(data.contiguous(), aff)


def scan_geometry(shape: Sequence[int], affine, *, kind: str = "cone", views: int = 360,
                  arc: Union[float, str] = 360.0, sid: float = 1000.0, sdd: float = 1500.0,
                  pixel_size: Optional[float] = None, detector: Optional[Tuple[int, int]] = None
                  ) -> Tuple[Geometry, dict]:
    """Circular orbit about world z through the volume centre, detector just covering the volume.

    ``kind`` "cone" or "parallel"; ``arc`` in degrees or "short" (180° + the detector's fan angle);
    ``pixel_size`` (mm, default voxel size × magnification); ``detector`` (rows, cols) (default: just
    covers the volume in every view). Returns the geometry and a plain description of the scan.
    """
    shape = np.asarray(shape, dtype=np.float64)
    A = np.asarray(affine, dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = corners @ A[:3, :3].T + A[:3, 3]
    iso = A[:3, :3] @ ((shape - 1) / 2) + A[:3, 3]
    rel = world - iso
    r = float(np.hypot(rel[:, 0], rel[:, 1]).max())          # bounding cylinder about the orbit axis
    hz = float(np.abs(rel[:, 2]).max())
    sp = np.linalg.norm(A[:3, :3], axis=0)
    cone = kind == "cone"
    if cone:
        if sdd <= sid:
            raise ScanError(f"--sdd ({sdd:g} mm) must be larger than --sid ({sid:g} mm)")
        if r >= sid:
            raise ScanError(f"the source orbit (--sid {sid:g} mm) passes through the volume (radius {r:.0f} mm)")
        mag = sdd / sid
        halfw = sdd * math.tan(math.asin(r / sid))
        halfh = hz * sdd / (sid - r)
        fan = math.asin(r / sid)
    else:
        mag, halfw, halfh, fan = 1.0, r, hz, 0.0
    if pixel_size is not None:
        ph = pw = float(pixel_size)
    else:
        pw = float(min(sp[0], sp[1]) * mag)
        ph = float(sp[2] * mag)
    if detector is not None:
        rows, cols = detector
    else:
        cols = int(math.ceil(2 * halfw / pw)) + 2
        rows = int(math.ceil(2 * halfh / ph)) + 2
    if cone:                                   # the detector's own half fan angle (its outermost column)
        fan = math.atan((cols - 1) / 2 * pw / sdd)
    arc_rad = math.pi + 2 * fan if arc == "short" else math.radians(float(arc))
    if arc_rad >= 2 * math.pi - 1e-9:
        ang = torch.arange(views, dtype=torch.float64) * (2 * math.pi / views)
    else:
        ang = torch.linspace(0.0, arc_rad, views, dtype=torch.float64)
    g = circular_orbit(ang, rows=rows, cols=cols, pixel_size=(ph, pw), sid=sid, sdd=sdd, kind=kind,
                       isocenter=tuple(float(x) for x in iso))
    desc = {"kind": kind, "views": views, "arc_deg": math.degrees(arc_rad), "rows": rows, "cols": cols,
            "pixel_size_mm": [ph, pw], "sid_mm": sid if cone else None, "sdd_mm": sdd if cone else None,
            "isocenter_mm": iso.tolist(), "fan_half_angle_deg": math.degrees(fan),
            "angles_deg": [round(math.degrees(a), 6) for a in ang.tolist()]}
    return g, desc


def simulate(mu: torch.Tensor, geometry: Geometry, affine, method: str = "siddon",
             progress: Optional[Callable[[int], object]] = None) -> torch.Tensor:
    """Line integrals ``(V, rows, cols)`` of ``mu``, in chunks of views on the CPU; ``progress(n)`` after each."""
    from xwin.kernels import project

    V = geometry.num_views
    chunk = V if mu.device.type == "cuda" else max(1, min(V, 12))
    out = []
    for v0 in range(0, V, chunk):
        idx = list(range(v0, min(V, v0 + chunk)))
        out.append(project(mu, geometry[idx], affine=affine, method=method))
        if progress is not None:
            progress(len(idx))
    return torch.cat(out, 0)


def add_noise(p: torch.Tensor, I0: float, seed: int) -> torch.Tensor:
    """Poisson counts with mean I0·exp(−p) (counts clamped at 1 photon), back to line integrals."""
    gen = torch.Generator().manual_seed(int(seed))
    lam = (float(I0) * torch.exp(-p.detach().double().cpu()))
    counts = torch.poisson(lam, generator=gen).clamp(min=1.0)
    return (-torch.log(counts / float(I0))).to(p.dtype).to(p.device)
