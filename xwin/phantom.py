"""A procedural chest CT phantom (:func:`chest_phantom`): seeded, deterministic anatomy in HU on any grid,
for tests and data-free runs. Also importable from :mod:`xwin.data`."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .io import Volume

__all__ = ["chest_phantom", "PHANTOM_HU"]


#: Nominal HU of the phantom's tissues (each is jittered a little per seed).
PHANTOM_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "lung": -850.0,
    "heart": 40.0,
    "liver": 60.0,
    "vessel": 40.0,
    "vertebra": 700.0,
    "disc": 80.0,
    "rib": 800.0,
    "sternum": 500.0,
    "nodule": 40.0,
}


def _slab(coord: torch.Tensor, lo: float, hi: float) -> slice:
    """Index range of a sorted 1D coordinate array lying within [lo, hi]."""
    i0 = int(torch.searchsorted(coord, torch.tensor(lo, dtype=coord.dtype)))
    i1 = int(torch.searchsorted(coord, torch.tensor(hi, dtype=coord.dtype), right=True))
    return slice(i0, max(i0, i1))


class _Canvas:
    """World-coordinate grid (anatomical mm, before scaling) plus the HU volume being painted."""

    def __init__(self, shape, spacing, scale):
        self.shape = shape
        # World coordinates of voxel centres, centred on the origin, divided by the anatomy scale so
        # that all structures below are written in adult-sized millimetres.
        self.axes = [
            (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * float(sp) / scale
            for n, sp in zip(shape, spacing)
        ]
        self.x = self.axes[0].float().view(-1, 1, 1)
        self.y = self.axes[1].float().view(1, -1, 1)
        self.z = self.axes[2].float().view(1, 1, -1)
        self.hu = torch.full(shape, PHANTOM_HU["air"], dtype=torch.float32)

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie inside the axis-aligned box [lo, hi]."""
        return tuple(_slab(a, float(l), float(h)) for a, l, h in zip(self.axes, lo, hi))

    def sub(self, sl):
        return self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]]


def _ellipsoid(x, y, z, c, r, angle_z: float = 0.0):
    """Inside test of an ellipsoid with centre c, semi-axes r, rotated by angle_z about z."""
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    if angle_z:
        ca, sa = np.cos(angle_z), np.sin(angle_z)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2 <= 1.0


def _tube(cv: _Canvas, p0, p1, r0: float, r1: float, value: float, where=None):
    """Paint a tapered tube (capsule) from p0 (radius r0) to p1 (radius r1); optional mask(x,y,z)."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    rmax = max(r0, r1)
    sl = cv.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if any(s.stop <= s.start for s in sl):
        return
    x, y, z = cv.sub(sl)
    d = p1 - p0
    L2 = float(d @ d) + 1e-12
    t = (((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / L2).clamp(0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    r = r0 + (r1 - r0) * t
    m = dist2 <= r * r
    if where is not None:
        m = m & where(x, y, z)
    block = cv.hu[sl]
    block[m] = float(value)


def chest_phantom(
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    seed: int = 0,
    nodules: bool = True,
) -> Volume:
    """A procedural chest CT in HU whose anatomy varies with ``seed``; centred on the world origin.

    Axis-aligned RAS+ grid: ``affine = diag(spacing)`` with the origin chosen so that the volume centre
    is at (0, 0, 0) mm; i runs to the patient's right (+x), j anteriorly (+y), k superiorly (+z).
    Contents (nominal HU in :data:`PHANTOM_HU`, each jittered per seed): air outside; an elliptic
    body of soft tissue (~40) with a subcutaneous fat layer (~-100); two lungs (~-850) with branching
    vessels and diaphragm domes; trachea and main bronchi (air); a heart (~40) indenting the left lung;
    liver (~60) under the right dome; a spine of vertebral bodies (~700) with discs and neural arches;
    curved ribs (~800) sloping down anteriorly; a sternum (~500); optional solid nodules (~40) in the
    lungs. Sizes, positions, rib count/spacing and nodules come from ``seed``. The anatomy is adult
    sized (about 32 cm wide) when the field of view allows, else scaled down to fit it.
    Deterministic: the same arguments give the same volume on any machine.
    """
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(shape), (3,)))
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    if min(shape) < 2:
        raise ValueError(f"chest_phantom: shape must be at least 2 per axis, got {shape}")
    if min(spacing) <= 0:
        raise ValueError(f"chest_phantom: spacing must be positive, got {spacing}")
    rng = np.random.default_rng(seed)

    def U(a, b):
        return float(rng.uniform(a, b))

    extent = np.asarray(shape) * np.asarray(spacing)
    # Anatomy sized for a ~340 x 240 mm adult chest, scaled down to fit smaller fields of view.
    scale = float(min(1.0, extent[0] / 380.0, extent[1] / 280.0))
    cv = _Canvas(shape, spacing, scale)
    hz = extent[2] / 2.0 / scale  # half height in anatomical mm
    hu = {k: v + (U(-15, 15) if k not in ("air",) else 0.0) for k, v in PHANTOM_HU.items()}
    hu["lung"] = PHANTOM_HU["lung"] + U(-40, 40)
    hu["vertebra"] = PHANTOM_HU["vertebra"] + U(-60, 60)
    hu["rib"] = PHANTOM_HU["rib"] + U(-60, 60)
    x, y, z = cv.x, cv.y, cv.z

    # Body: elliptic cylinder, fat shell.
    a = 160.0 * U(0.92, 1.06)
    b = 112.0 * U(0.90, 1.08)
    y0 = U(-6, 6)
    fat_t = U(8, 20)
    body = ((x / a) ** 2 + ((y - y0) / b) ** 2) <= 1.0
    inner = ((x / (a - fat_t)) ** 2 + ((y - y0) / (b - fat_t)) ** 2) <= 1.0
    body = body.expand(shape)
    inner = inner.expand(shape)
    cv.hu[body] = hu["fat"]
    cv.hu[inner] = hu["soft_tissue"]

    # Lungs: ellipsoids above diaphragm domes (right dome higher, the liver lies under it).
    # The rib cage: an elliptic ring just inside the fat layer; lungs stay inside it.
    ring_a = a - fat_t - U(5, 10)
    ring_b = b - fat_t - U(5, 10)
    rad_t, vert_t = U(4.0, 6.0), U(6.0, 8.5)  # rib half-thickness (radial) and half-height
    cage_a, cage_b = ring_a - rad_t - 3.0, ring_b - rad_t - 3.0
    lung_dz = U(-15, 15)
    lungs = []
    for side in (+1, -1):  # +1: patient's right (+x), -1: left
        cx = side * 76.0 * U(0.94, 1.06)
        c = (cx, y0 + U(-10, 0), -10.0 + lung_dz)
        r = (62.0 * U(0.9, 1.1), 85.0 * U(0.9, 1.1), 130.0 * U(0.92, 1.08))
        z_dome = c[2] - r[2] * 0.62 + (12.0 if side > 0 else 0.0) + U(-8, 8)
        lungs.append((c, r, z_dome))

    def in_lung(xs, ys, zs):
        m = torch.zeros(torch.broadcast_shapes(xs.shape, ys.shape, zs.shape), dtype=torch.bool)
        for c, r, z_dome in lungs:
            dome = z_dome + 35.0 * torch.exp(-(((xs - c[0]) / 45.0) ** 2) - (((ys - c[1]) / 55.0) ** 2))
            m |= _ellipsoid(xs, ys, zs, c, r) & (zs > dome)
        return m & ((xs / cage_a) ** 2 + ((ys - y0) / cage_b) ** 2 <= 1.0)

    lung_mask = in_lung(x, y, z).expand(shape)
    cv.hu[lung_mask] = hu["lung"]

    # Pulmonary vessels: tapered tubes branching out from each hilum.
    for (c, r, z_dome), side in zip(lungs, (+1, -1)):
        hilum = np.array([c[0] - side * r[0] * 0.55, c[1] + 5.0, c[2] - 10.0])
        for _ in range(int(rng.integers(5, 9))):
            # Random direction into the lung, mostly lateral and up/down.
            end = hilum + np.array(
                [side * U(0.3, 1.0) * r[0] * 1.1, U(-0.7, 0.7) * r[1], U(-0.8, 0.8) * r[2]]
            )
            mid = hilum + (end - hilum) * U(0.35, 0.6) + np.array([0.0, U(-8, 8), U(-8, 8)])
            r0 = U(3.5, 6.0)
            _tube(cv, hilum, mid, r0, r0 * 0.7, hu["vessel"], where=in_lung)
            _tube(cv, mid, end, r0 * 0.7, 1.2, hu["vessel"], where=in_lung)
            branch = mid + (end - mid) * U(0.3, 0.7) + np.array(
                [side * U(5, 25), U(-25, 25), U(-30, 30)]
            )
            _tube(cv, mid, branch, r0 * 0.5, 1.0, hu["vessel"], where=in_lung)

    # Heart: rotated ellipsoid, anterior and to the patient's left, low in the chest.
    hc = (U(-30, -10), y0 + U(15, 35), lungs[0][0][2] - 45.0 + U(-10, 10))
    hr = (68.0 * U(0.88, 1.1), 52.0 * U(0.88, 1.1), 58.0 * U(0.88, 1.1))
    cv.hu[_ellipsoid(x, y, z, hc, hr, angle_z=U(-0.6, -0.2)).expand(shape) & inner] = hu["heart"]

    # Liver under the right dome (outside the lungs).
    lc = (70.0, y0 + U(-10, 10), lungs[0][2] - 80.0)
    liver = _ellipsoid(x, y, z, lc, (85.0, min(80.0, b - fat_t - 10), 70.0)).expand(shape) & inner & ~lung_mask
    cv.hu[liver] = hu["liver"]

    # Trachea and main bronchi (air).
    ty = y0 + U(-12, 2)
    carina = np.array([0.0, ty, lungs[0][0][2] + U(35, 55)])
    top = np.array([0.0, ty + U(-5, 5), hz + 50.0])
    tr = U(8, 11)
    _tube(cv, top, carina, tr, tr, hu["air"])
    for side in (+1, -1):
        _tube(cv, carina, carina + np.array([side * U(35, 50), U(-10, 0), -U(20, 35)]), tr * 0.75, tr * 0.55, hu["air"])

    # Spine: vertebral bodies with discs, neural arch and spinous process, along the whole height.
    sy = y0 - b + fat_t + U(62, 72)  # vertebral body centre (posterior)
    sr = 19.0 * U(0.9, 1.1)
    v_h = 24.0 * U(0.9, 1.1)  # vertebra + disc height
    disc = v_h * 0.22
    phase = U(0, v_h)
    zz = torch.remainder(z - phase, v_h)
    in_body_col = ((x / sr) ** 2 + ((y - sy) / (sr * 0.85)) ** 2) <= 1.0
    is_disc = zz < disc
    cv.hu[(in_body_col & ~is_disc).expand(shape)] = hu["vertebra"]
    cv.hu[(in_body_col & is_disc).expand(shape)] = hu["disc"]
    canal_y = sy - sr * 0.85 - 10.0
    rr = torch.sqrt(x**2 + (y - canal_y) ** 2)
    arch = (rr <= 15.0) & (rr > 8.5) & (y < canal_y + 4.0)
    spinous = (x.abs() <= 4.0) & (y <= canal_y - 12.0) & (y >= canal_y - 34.0) & (zz >= disc) & (zz < v_h * 0.75)
    bone_post = (arch & ~is_disc) | spinous
    cv.hu[bone_post.expand(shape) & inner] = hu["vertebra"]
    # Transverse processes, reaching toward the ribs.
    tp = (x.abs() <= 36.0) & ((y - canal_y).abs() <= 5.0) & (zz >= disc) & (zz < disc + 8.0)
    cv.hu[tp.expand(shape) & inner] = hu["vertebra"]

    # Ribs: curved elliptic tubes following the chest wall from the spine round to the front,
    # dropping inferiorly as they go anteriorly; upper ribs are shorter and tighter.
    phi_post = -np.pi / 2 + U(0.30, 0.42)  # angle from +x towards +y, measured about (0, y0)
    rib_gap = U(21.0, 27.0)
    n_ribs = int(rng.integers(10, 13))
    z_top = lungs[0][0][2] + lungs[0][1][2] * 0.85
    # In-plane polar quantities about (0, y0), per side (the angle is mirrored for the left side).
    rho = torch.sqrt(x**2 + (y - y0) ** 2)  # (X, Y, 1)
    polar = []
    for side in (+1, -1):
        phi = torch.atan2((y - y0).expand_as(rho), side * x.expand_as(rho))
        ring = ring_a * ring_b / torch.sqrt((ring_b * torch.cos(phi)) ** 2 + (ring_a * torch.sin(phi)) ** 2)
        polar.append((phi, ring))
    for k in range(n_ribs):
        zk = z_top - k * rib_gap + U(-3, 3)
        f = 0.62 + 0.38 * min(1.0, (k + 1) / 4.0)  # thorax narrower at the top
        phi_ant = np.pi / 2 - U(0.45, 0.7) - (0.5 if k < 2 else 0.0)
        drop = U(35, 60) * (0.6 if k < 2 else 1.0)
        zlo, zhi = zk - drop - vert_t, zk + vert_t
        sl = (slice(None), slice(None), _slab(cv.axes[2], zlo, zhi))
        if sl[2].stop <= sl[2].start:
            continue
        zs = cv.z[:, :, sl[2]]
        for phi, ring in polar:
            t = (phi - phi_post) / (phi_ant - phi_post)
            z_rib = zk - drop * t.clamp(0, 1) ** 1.3
            m = (((rho - f * ring) / rad_t) ** 2 + ((zs - z_rib) / vert_t) ** 2 <= 1.0) & (t >= 0) & (t <= 1)
            block = cv.hu[sl]
            block[m] = hu["rib"]

    # Sternum: anterior plate in the midline.
    st_y1 = y0 + b - fat_t - U(3, 8)
    st = (x.abs() <= U(11, 16)) & (y <= st_y1) & (y >= st_y1 - U(9, 13)) & (z <= z_top - 15) & (z >= z_top - U(160, 200))
    cv.hu[st.expand(shape)] = hu["sternum"]

    # Nodules: solid spheres well inside the lungs.
    if nodules:
        n_nod = int(rng.integers(1, 4))
        lung_idx = torch.nonzero(lung_mask)
        placed = 0
        for _ in range(200):
            if placed >= n_nod or lung_idx.shape[0] == 0:
                break
            i = lung_idx[int(rng.integers(0, lung_idx.shape[0]))]
            p = np.array([float(cv.axes[d][int(i[d])]) for d in range(3)])
            rad = max(U(4.0, 12.0), 0.8 * max(spacing) / scale)  # at least about one voxel across
            # Require the sphere's centre and six extreme points to be in the lung.
            probes = [p] + [p + s * rad * e for e in np.eye(3) for s in (1, -1)]
            ok = all(
                bool(in_lung(torch.tensor(q[0]), torch.tensor(q[1]), torch.tensor(q[2]))) for q in probes
            )
            if not ok:
                continue
            sl = cv.box(p - rad, p + rad)
            xs, ys, zs = cv.sub(sl)
            m = (xs - p[0]) ** 2 + (ys - p[1]) ** 2 + (zs - p[2]) ** 2 <= rad * rad
            block = cv.hu[sl]
            block[m] = hu["nodule"] + U(-20, 20)
            placed += 1

    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return Volume(cv.hu, affine)
