"""The torch reference projector: plain torch, any device, chunks of rays so peak memory stays bounded.

It implements exactly the operators the Triton kernels implement (same ray parametrisation, same voxel
walk, same sample positions), so it serves three purposes: the CPU backend, the fallback where Triton
cannot run, and the reference the kernels are tested against.

Forward and adjoint share one generator of (flat voxel index, weight) pairs per ray, so ``backproject`` is
the exact transpose of ``project`` by construction.

* Siddon: the incremental voxel walk (Siddon 1985 / Jacobs 1998). In index space the voxel boundaries are
  the planes ``i ± ½``; per ray we clip to the box ``[−½, N−½]``, find the entry voxel, and repeatedly step
  to the nearest next plane crossing, adding ``segment length (mm) × voxel value``. Memory O(rays).
* Trilinear: the zero-padded trilinear interpolant of the voxel centres (support ``(−1, N)`` per axis),
  integrated by the midpoint rule with a fixed step ``dt = step × min spacing`` (mm) starting at the
  entry into the support: samples at ``t = (k + ½)·dt`` for all k with ``(k + ½)·dt < length``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Tuple

import torch

from .layout import RAY_CENTER, RAY_FIRST, RAY_M, RAY_U, RAY_V

__all__ = ["forward", "adjoint"]

_SIDDON_CHUNK = 1 << 17          # rays per chunk for the voxel walk (memory O(rays))
_TRILINEAR_BUDGET = 1 << 16      # samples × rays per inner block for trilinear (cache-sized: measured faster)
#: a Siddon walk over fewer rays than this runs its per-step operations on one torch thread (see _walk_threads)
_WALK_PARALLEL_MIN = 1 << 17


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class RayBlock:
    """Rays ``start … stop−1`` of one batch entry: ``view`` (R,), pixel offsets ``r``, ``c`` from the detector
    centre (R,), origin ``o`` and direction ``e`` per mm (R, 3), range ``tlo``, ``thi`` (R,); for cone beam
    also ``d = P − S`` (R, 3), the world length ``length = |M d|`` and ``m`` (R, 9), M row-major."""

    def __init__(self, params_b: torch.Tensor, kind: str, rows: int, cols: int, start: int, stop: int):
        dev, dt = params_b.device, params_b.dtype
        idx = torch.arange(start, stop, device=dev)
        self.view = idx // (rows * cols)
        pix = idx % (rows * cols)
        self.r = (pix // cols).to(dt) - (rows - 1) / 2
        self.c = (pix % cols).to(dt) - (cols - 1) / 2
        p = params_b[self.view]
        r, c = self.r, self.c
        P = (p[:, RAY_CENTER:RAY_CENTER + 3] + c[:, None] * p[:, RAY_U:RAY_U + 3]
             + r[:, None] * p[:, RAY_V:RAY_V + 3])
        if kind == "cone":
            S = p[:, RAY_FIRST:RAY_FIRST + 3]
            d = P - S
            m = p[:, RAY_M:RAY_M + 9]
            dx, dy, dz = d.unbind(1)
            # world length |M d|, evaluated in the same operation order as the Triton kernels so that both
            # round alike in float32 (nearly axis-parallel rays amplify last-bit differences)
            wx = m[:, 0] * dx + m[:, 1] * dy + m[:, 2] * dz
            wy = m[:, 3] * dx + m[:, 4] * dy + m[:, 5] * dz
            wz = m[:, 6] * dx + m[:, 7] * dy + m[:, 8] * dz
            length = torch.sqrt(wx * wx + wy * wy + wz * wz)
            self.d, self.m, self.length = d, m, length
            self.o, self.e = S, d / length[:, None]
            self.tlo, self.thi = torch.zeros_like(length), length
        else:
            self.o, self.e = P, p[:, RAY_FIRST:RAY_FIRST + 3]
            inf = torch.full((P.shape[0],), math.inf, device=dev, dtype=dt)
            self.tlo, self.thi = -inf, inf


def ray_blocks(params_b: torch.Tensor, kind: str, rows: int, cols: int, chunk: int) -> Iterator[Tuple[int, RayBlock]]:
    """Yield (start, RayBlock) for chunks of the V·rows·cols rays of one batch entry (``params_b``: (V, 24)
    on the compute device/dtype)."""
    n = params_b.shape[0] * rows * cols
    for start in range(0, n, chunk):
        yield start, RayBlock(params_b, kind, rows, cols, start, min(n, start + chunk))


def ray_chunks(params_b: torch.Tensor, kind: str, rows: int, cols: int, chunk: int):
    """Yield (start, o, e, tlo, thi) for chunks of the V·rows·cols rays of one batch entry.

    ``params_b``: (V, 24) on the compute device/dtype. ``o``, ``e``: (R, 3); ``tlo``, ``thi``: (R,).
    """
    for start, rb in ray_blocks(params_b, kind, rows, cols, chunk):
        yield start, rb.o, rb.e, rb.tlo, rb.thi


def clip(o, e, lo, hi, tlo, thi, upper_open: bool):
    """Slab clipping of q(t) = o + t e to the box lo ≤ q ≤ hi (per axis). Returns t0, t1 (miss: t1 ≤ t0).

    For an axis with e = 0 the ray is inside when lo ≤ o < hi (``upper_open``) or lo < o < hi otherwise.
    """
    nz = e != 0
    safe = torch.where(nz, e, torch.ones_like(e))
    ta = (lo - o) / safe
    tb = (hi - o) / safe
    inside = (o >= lo) & (o < hi) if upper_open else (o > lo) & (o < hi)
    big = torch.full_like(o, math.inf)
    tmin = torch.where(nz, torch.minimum(ta, tb), torch.where(inside, -big, big))
    tmax = torch.where(nz, torch.maximum(ta, tb), torch.where(inside, big, -big))
    t0 = torch.maximum(tlo, tmin.amax(dim=1))
    t1 = torch.minimum(thi, tmax.amin(dim=1))
    return t0, t1


def siddon_walk(o, e, tlo, thi, shape, detail: bool = False) -> Iterator[tuple]:
    """Yield (ray ids, flat voxel index, segment length mm) for every step of every ray's voxel walk.

    Zero-length or out-of-volume steps carry weight 0 (and a valid index). The ``ids`` tensor is the same
    object from step to step until finished rays are dropped (every 16 steps), so consumers can keep
    per-ray data for it.

    The float arithmetic is the kernels', operation for operation: the next crossing on an axis is
    ``(c − p)·inv + b`` with ``c = i + ½·s`` the next boundary plane (a half-integer, exact), the step goes
    to the axis of the smallest crossing with ties to the lowest axis, and the segment is
    ``max(min(crossings, L) − t, 0)``. Speed on the CPU comes from how it is evaluated: only float tensor
    operations in the hot loop, most in place (bool and int64 element-wise operations and bool→float
    conversions run 4–7× slower in torch on the CPU than float ones), with the axis choice as 0/1 float
    masks. Two representation changes keep that exact: an axis the ray never crosses gets the crossing
    time ``finfo.max`` instead of +inf (so ``x·0`` stays 0; it never wins against the finite ``L``), and
    the flat voxel index is carried in float64 (exact to 2^53) and advanced by ``s × stride`` of the axis
    stepped on.

    ``detail=True`` (the geometry-gradient pass) yields instead ``(ids, flat, ok, t, tcross, L, mx, my, mz,
    w)`` per step: the voxel's in-volume flag (0/1), the step's start ``t`` and the crossing time ``tcross``
    that ends it (both relative to the entry point), the ray's length ``L`` in the box, the 0/1 masks of the
    axis crossed there, and the weight ``w`` of the plain walk. The yielded buffers are reused: consume them before the next step.
    """
    dev, dt = o.device, o.dtype
    N = torch.tensor(shape, device=dev, dtype=dt)
    t0, t1 = clip(o, e, -0.5, N - 0.5, tlo, thi, upper_open=True)
    ids = torch.nonzero(t1 > t0).flatten()
    if ids.numel() == 0:
        return
    o, e, t0, t1 = o[ids], e[ids], t0[ids], t1[ids]
    L = t1 - t0
    p = o + t0[:, None] * e                       # re-origin at the entry point
    s = torch.sign(e)
    q = p + 0.5
    i = torch.where(e < 0, torch.ceil(q) - 1, torch.floor(q))
    i = torch.minimum(torch.maximum(i, torch.zeros_like(i)), N - 1)
    big = torch.finfo(dt).max
    # axes with e = 0 are never crossed. So are axes with |e| ≤ 1e-30, here and in the kernels (there 1/e
    # overflows float32 for denormal components, and (c − p)·inf is NaN for a ray starting on a face)
    nz = e.abs() > 1e-30
    inv = torch.where(nz, 1.0 / torch.where(nz, e, torch.ones_like(e)), torch.zeros_like(e))
    b = torch.where(nz, torch.zeros_like(e), torch.full_like(e, big))
    s = torch.where(nz, s, torch.zeros_like(s))
    c = i + 0.5 * s
    tn = (c - p) * inv + b
    # u < 0 while the voxel index is inside on that axis; it grows by 1 per step on the axis, and the index
    # leaves the volume when u reaches 0 (s > 0: i = N; s < 0: i = −1)
    u = torch.where(s > 0, i - N, torch.where(s < 0, -i - 1, torch.full_like(i, -1.0)))
    sY, sZ = shape[1] * shape[2], shape[2]
    ddt = dt if sY <= (1 << 24) else torch.float64   # s × stride exact in the mask arithmetic
    strides = torch.tensor([sY, sZ, 1], device=dev, dtype=torch.float64)
    dflat = s.to(ddt) * strides.to(ddt)
    flat = (i.double() * strides).sum(1)
    nvox_1 = float(shape[0] * shape[1] * shape[2] - 1)

    def split(x):
        return [x[:, a].contiguous() for a in range(3)]

    (px, py, pz), (cx, cy, cz), (sx, sy, sz) = split(p), split(c), split(s)
    (vx, vy, vz), (bx, by, bz), (tx, ty, tz) = split(inv), split(b), split(tn)
    (ux, uy, uz), (dX, dY, dZ) = split(u), split(dflat)
    t = torch.zeros_like(L)
    mx, my, mz, buf, okf = (torch.empty_like(L) for _ in range(5))
    it = 0
    while True:
        tmin3 = torch.minimum(torch.minimum(tx, ty), tz)
        tmin = torch.minimum(tmin3, L)
        seg = torch.sub(tmin, t).clamp_(min=0.0)
        w = seg.mul_(torch.lt(torch.maximum(torch.maximum(ux, uy), uz), 0.0, out=okf))
        # the axis stepped on: the first one whose crossing is the minimum
        torch.eq(tx, tmin3, out=mx)
        torch.eq(ty, tmin3, out=my).mul_(torch.rsub(mx, 1.0))
        torch.neg(mx, out=mz).add_(1.0).sub_(my)
        if detail:
            yield ids, flat.clamp(0.0, nvox_1).long(), okf, t, tmin3, L, mx, my, mz, w
        else:
            yield ids, flat.clamp(0.0, nvox_1).long(), w
        for m, cc, ss, pp, vv, bb, tt, uu in ((mx, cx, sx, px, vx, bx, tx, ux), (my, cy, sy, py, vy, by, ty, uy),
                                              (mz, cz, sz, pz, vz, bz, tz, uz)):
            cc.addcmul_(m, ss)
            torch.sub(cc, pp, out=buf).mul_(vv).add_(bb)        # the new crossing (used where m = 1)
            tt.mul_(torch.rsub(m, 1.0)).addcmul_(buf, m)         # exact: x·0 + y·1 = y, x·1 + y·0 = x
            uu.add_(m)
        d = (mx.to(ddt) * dX).addcmul_(my.to(ddt), dY).addcmul_(mz.to(ddt), dZ)
        flat.add_(d)
        t = tmin
        it += 1
        if it % 16 == 0:                          # drop finished rays now and then
            keep = t < L
            if not keep.any():
                return
            if not keep.all():
                (ids, L, t, flat, px, py, pz, cx, cy, cz, sx, sy, sz, vx, vy, vz, bx, by, bz, tx, ty, tz,
                 ux, uy, uz, dX, dY, dZ) = (
                    x[keep] for x in (ids, L, t, flat, px, py, pz, cx, cy, cz, sx, sy, sz, vx, vy, vz,
                                      bx, by, bz, tx, ty, tz, ux, uy, uz, dX, dY, dZ))
                mx, my, mz, buf, okf = (torch.empty_like(L) for _ in range(5))


def padded_strides(shape):
    """Strides of the volume zero-padded by one voxel on every side, and the flat offsets of the 8 cell
    corners (a, b, c) ∈ {0, 1}³ from the corner (0, 0, 0)."""
    X, Y, Z = shape
    sY, sZ = (Y + 2) * (Z + 2), Z + 2
    return sY, sZ, [a * sY + b * sZ + c for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def pad_flat(vol: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) -> the flat (X+2)(Y+2)(Z+2) volume with a zero border (the interpolant's zero padding)."""
    return torch.nn.functional.pad(vol, (1, 1, 1, 1, 1, 1)).reshape(-1)


def trilinear_samples(o, e, tlo, thi, shape, dt: float):
    """Yield (ray ids (R,), flat index (R, K), weights [8 × (R, K)] mm, corner offsets [8]) blocks.

    Indices address the volume zero-padded by one voxel (:func:`pad_flat`): corner c of sample (r, k) is
    at ``flat[r, k] + offsets[c]``, always inside the padded buffer, and corners outside the volume read
    the zero border, which is the interpolant's zero padding, so no corner needs a mask. Samples past the
    end of the ray have weight 0 (their indices are clamped valid).
    """
    dev, cdt = o.device, o.dtype
    N = torch.tensor(shape, device=dev, dtype=cdt)
    t0, t1 = clip(o, e, -1.0, N, tlo, thi, upper_open=False)
    ids = torch.nonzero(t1 > t0).flatten()
    if ids.numel() == 0:
        return
    o, e, t0, t1 = o[ids], e[ids], t0[ids], t1[ids]
    L = t1 - t0
    p = o + t0[:, None] * e
    for t, inside, ws, flat, offsets in sample_blocks(p, e, L, shape, dt):
        inside = inside * dt
        out_w = []
        for da in (0, 1):
            for db in (0, 1):
                wab = ws[0][da] * ws[1][db]
                for dc in (0, 1):
                    out_w.append(wab * ws[2][dc] * inside)
        yield ids, flat, out_w, offsets


def sample_blocks(p, e, L, shape, dt: float):
    """Midpoint samples ``t = (k + ½)·dt`` (relative to the entry points ``p``) of rays of lengths ``L``, in
    cache-sized blocks: yield (t (R, K), inside (R, K) 0/1, per-axis weights [(1 − f, f)] × 3, flat index
    (R, K) of corner (0, 0, 0) in the zero-padded volume, the 8 corner offsets (corner (a, b, c) at 4a+2b+c))."""
    dev, cdt = p.device, p.dtype
    kmax = int(torch.ceil(L.max() / dt).item()) + 1
    K = max(1, min(kmax, _TRILINEAR_BUDGET // max(p.shape[0], 1)))
    sY, sZ, offsets = padded_strides(shape)
    for k0 in range(0, kmax, K):
        k = torch.arange(k0, min(kmax, k0 + K), device=dev, dtype=cdt)
        t = (k[None, :] + 0.5) * dt                                  # (R, K)
        inside = (t < L[:, None]).to(cdt)
        ws, flat = [], None
        for a, (n, stride) in enumerate(zip(shape, (sY, sZ, 1))):
            q = p[:, a, None] + t * e[:, a, None]
            i0 = torch.floor(q)
            f = q - i0
            ws.append((1 - f, f))
            # padded coordinate of corner 0 is i0 + 1 ∈ [0, n] inside the support; clamp (float, exact)
            # only matters for samples past the end of the ray; float64 keeps the flat index exact
            ip = i0.clamp_(-1, n - 1).add_(1).double()
            flat = ip.mul_(stride) if flat is None else flat.add_(ip.mul_(stride))
        yield t, inside, ws, flat.long(), offsets


@contextlib.contextmanager
def _walk_threads(method: str, rays: int, device: torch.device):
    """One intra-op thread for the Siddon walk of fewer than ``_WALK_PARALLEL_MIN`` rays on the CPU.

    The walk issues ~30 element-wise operations per voxel step (thousands per projection), each over the
    live rays only. With several threads every one of them ends in a thread barrier; on a shared machine a
    barrier waits for a descheduled worker, and the projection collapsed from 0.4 s to 15 s (BENCHMARKS.md,
    "Threads"). Below ~10^5 rays per step a second thread gained nothing even on an idle machine (0.36 s on
    1 thread against 0.39 s on 2 at 200², same table), so there the walk runs on one thread, restoring
    torch's setting afterwards; larger walks (512² and up) keep torch's threads.
    """
    old = torch.get_num_threads()
    if device.type != "cpu" or method != "siddon" or rays >= _WALK_PARALLEL_MIN or old <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _setup(params, kind, rows, cols, vol_dtype, device):
    cdt = _compute_dtype(vol_dtype)
    return params.to(device=device, dtype=cdt), cdt


def forward(volume: torch.Tensor, params: torch.Tensor, kind: str, rows: int, cols: int, method: str,
            dt_mm: torch.Tensor) -> torch.Tensor:
    """volume (B, X, Y, Z) -> (B, V, rows, cols) line integrals (mm × volume units)."""
    B, X, Y, Z = volume.shape
    V = params.shape[1]
    prm, cdt = _setup(params, kind, rows, cols, volume.dtype, volume.device)
    out = torch.zeros(B, V * rows * cols, device=volume.device, dtype=cdt)
    with _walk_threads(method, min(V * rows * cols, _SIDDON_CHUNK), volume.device):
        _forward_into(out, volume, prm, kind, rows, cols, method, dt_mm, cdt)
    return out.reshape(B, V, rows, cols)


def _forward_into(out, volume, prm, kind, rows, cols, method, dt_mm, cdt):
    B, X, Y, Z = volume.shape
    for b in range(B):
        # Siddon reads the flat volume; trilinear a zero-bordered copy (see trilinear_samples)
        vol_b = volume[b].to(cdt)
        flatvol = vol_b.reshape(-1) if method == "siddon" else pad_flat(vol_b)
        acc = out[b]
        for start, o, e, tlo, thi in ray_chunks(prm[b], kind, rows, cols, _SIDDON_CHUNK):
            part = torch.zeros(o.shape[0], device=volume.device, dtype=cdt)
            if method == "siddon":
                # running sums per live ray, in walk order (acc += seg·v, as the kernels); written back to
                # ``part`` and re-read only when the walk drops finished rays, not every step
                last, racc = None, None
                for ids, flat, seg in siddon_walk(o, e, tlo, thi, (X, Y, Z)):
                    if ids is not last:
                        if last is not None:
                            part[last] = racc
                        last, racc = ids, part[ids]
                    racc.add_(seg.mul_(flatvol.take(flat)))
                if last is not None:
                    part[last] = racc
            else:
                for ids, flat, w, offs in trilinear_samples(o, e, tlo, thi, (X, Y, Z), float(dt_mm[b])):
                    # corner c of every sample: a view of the padded volume shifted by its offset
                    val = sum(flatvol[off:].take(flat) * wc for off, wc in zip(offs, w))
                    part.index_add_(0, ids, val.sum(1))
            acc[start:start + o.shape[0]] = part


def adjoint(proj: torch.Tensor, params: torch.Tensor, kind: str, shape, method: str,
            dt_mm: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """proj (B, V, rows, cols) -> (B, X, Y, Z): the exact transpose of :func:`forward`."""
    B, V, rows, cols = proj.shape
    X, Y, Z = shape
    prm, cdt = _setup(params, kind, rows, cols, out_dtype, proj.device)
    out = torch.zeros(B, X * Y * Z, device=proj.device, dtype=cdt)
    pf = proj.reshape(B, -1).to(cdt)
    with _walk_threads(method, min(V * rows * cols, _SIDDON_CHUNK), proj.device):
        _adjoint_into(out, pf, prm, kind, rows, cols, (X, Y, Z), method, dt_mm)
    return out.reshape(B, X, Y, Z).to(out_dtype)


def _adjoint_into(out, pf, prm, kind, rows, cols, shape, method, dt_mm):
    X, Y, Z = shape
    for b in range(pf.shape[0]):
        acc = out[b]
        if method != "siddon":          # trilinear scatters into a zero-bordered buffer, then crops it
            accp = out.new_zeros((X + 2) * (Y + 2) * (Z + 2))
        for start, o, e, tlo, thi in ray_chunks(prm[b], kind, rows, cols, _SIDDON_CHUNK):
            y = pf[b, start:start + o.shape[0]]
            if method == "siddon":
                last, yl = None, None
                for ids, flat, seg in siddon_walk(o, e, tlo, thi, (X, Y, Z)):
                    if ids is not last:
                        last, yl = ids, y[ids]
                    acc.index_add_(0, flat, seg * yl)
            else:
                for ids, flat, w, offs in trilinear_samples(o, e, tlo, thi, (X, Y, Z), float(dt_mm[b])):
                    yi = y[ids][:, None]
                    fl = flat.reshape(-1)
                    for off, wc in zip(offs, w):
                        accp[off:].index_add_(0, fl, (wc * yi).reshape(-1))
        if method != "siddon":
            acc.copy_(accp.reshape(X + 2, Y + 2, Z + 2)[1:-1, 1:-1, 1:-1].reshape(-1))
