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

import math
from typing import Iterator, Tuple

import torch

__all__ = ["forward", "adjoint"]

_SIDDON_CHUNK = 1 << 17          # rays per chunk for the voxel walk (memory O(rays))
_TRILINEAR_BUDGET = 1 << 20      # samples × rays per inner block for trilinear


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ray_chunks(params_b: torch.Tensor, kind: str, rows: int, cols: int, chunk: int):
    """Yield (start, o, e, tlo, thi) for chunks of the V·rows·cols rays of one batch entry.

    ``params_b``: (V, 24) on the compute device/dtype. ``o``, ``e``: (R, 3); ``tlo``, ``thi``: (R,).
    """
    V = params_b.shape[0]
    n = V * rows * cols
    dev, dt = params_b.device, params_b.dtype
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=dev)
        view = idx // (rows * cols)
        pix = idx % (rows * cols)
        r = (pix // cols).to(dt) - (rows - 1) / 2
        c = (pix % cols).to(dt) - (cols - 1) / 2
        p = params_b[view]
        P = p[:, 3:6] + c[:, None] * p[:, 6:9] + r[:, None] * p[:, 9:12]
        if kind == "cone":
            S = p[:, 0:3]
            d = P - S
            m = p[:, 12:21]
            dx, dy, dz = d.unbind(1)
            # world length |M d|, evaluated in the same operation order as the Triton kernels so that both
            # round alike in float32 (nearly axis-parallel rays amplify last-bit differences)
            wx = m[:, 0] * dx + m[:, 1] * dy + m[:, 2] * dz
            wy = m[:, 3] * dx + m[:, 4] * dy + m[:, 5] * dz
            wz = m[:, 6] * dx + m[:, 7] * dy + m[:, 8] * dz
            length = torch.sqrt(wx * wx + wy * wy + wz * wz)
            e = d / length[:, None]
            yield start, S, e, torch.zeros_like(length), length
        else:
            e = p[:, 0:3]
            inf = torch.full((P.shape[0],), math.inf, device=dev, dtype=dt)
            yield start, P, e, -inf, inf


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


def siddon_walk(o, e, tlo, thi, shape) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (ray ids, flat voxel index, segment length mm) for every step of every ray's voxel walk.

    Zero-length or out-of-volume steps carry weight 0 (and a clamped, valid index).
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
    nz = e != 0
    inv = torch.where(nz, 1.0 / torch.where(nz, e, torch.ones_like(e)), torch.zeros_like(e))
    # per-axis state as separate 1-D tensors (cheaper than (R, 3) reductions in the hot loop)
    px, py, pz = p.unbind(1)
    sx, sy, sz = s.unbind(1)
    ix, iy, iz = i.unbind(1)
    vx, vy, vz = inv.unbind(1)
    bx, by, bz = (torch.where(nz[:, a], torch.zeros_like(L), torch.full_like(L, math.inf)) for a in range(3))
    tnx = (ix + 0.5 * sx - px) * vx + bx          # +inf for axes the ray does not cross
    tny = (iy + 0.5 * sy - py) * vy + by
    tnz = (iz + 0.5 * sz - pz) * vz + bz
    nxf, nyf, nzf = (float(n) for n in shape)
    sY, sZ = shape[1] * shape[2], shape[2]
    t = torch.zeros_like(L)
    it = 0
    while True:
        tmin = torch.minimum(torch.minimum(tnx, tny), torch.minimum(tnz, L))
        seg = (tmin - t).clamp_(min=0.0)
        ok = (ix >= 0) & (ix < nxf) & (iy >= 0) & (iy < nyf) & (iz >= 0) & (iz < nzf)
        # integer arithmetic: float32 cannot index past 2^24 voxels
        flat = (ix.clamp(0, nxf - 1).long() * sY + iy.clamp(0, nyf - 1).long() * sZ
                + iz.clamp(0, nzf - 1).long())
        yield ids, flat, seg * ok
        mx = (tnx <= tny) & (tnx <= tnz)           # ties: lowest axis first (the kernels do the same)
        my = ~mx & (tny <= tnz)
        mz = ~(mx | my)
        ix = ix + sx * mx
        iy = iy + sy * my
        iz = iz + sz * mz
        tnx = torch.where(mx, (ix + 0.5 * sx - px) * vx + bx, tnx)
        tny = torch.where(my, (iy + 0.5 * sy - py) * vy + by, tny)
        tnz = torch.where(mz, (iz + 0.5 * sz - pz) * vz + bz, tnz)
        t = tmin
        it += 1
        if it % 16 == 0:                          # drop finished rays now and then
            keep = t < L
            if not keep.any():
                return
            if not keep.all():
                (ids, L, t, px, py, pz, sx, sy, sz, ix, iy, iz, vx, vy, vz, bx, by, bz, tnx, tny, tnz) = (
                    x[keep] for x in (ids, L, t, px, py, pz, sx, sy, sz, ix, iy, iz, vx, vy, vz, bx, by, bz,
                                      tnx, tny, tnz))


def trilinear_samples(o, e, tlo, thi, shape, dt: float):
    """Yield (ray ids (R,), flat index (R, K), weights (8, R, K) mm, corner offsets (8,)) blocks.

    The 8 corners of sample (r, k) sit at ``flat[r, k] + offsets[c]``; weights of corners outside the
    volume (zero padding) or of samples past the end of the ray are 0 (their indices are clamped valid).
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
    kmax = int(torch.ceil(L.max() / dt).item()) + 1
    R = ids.numel()
    K = max(1, min(kmax, _TRILINEAR_BUDGET // max(R, 1)))
    X, Y, Z = shape
    sY, sZ = Y * Z, Z
    # a padded flat index keeps all 8 corners of a clamped base voxel inside the buffer: base in [-1, N-1]
    for k0 in range(0, kmax, K):
        k = torch.arange(k0, min(kmax, k0 + K), device=dev, dtype=cdt)
        t = (k[None, :] + 0.5) * dt                                  # (R, K)
        inside = (t < L[:, None]).to(cdt) * dt
        ws, bases = [], []
        for a, n in enumerate(shape):
            q = p[:, a, None] + t * e[:, a, None]
            i0 = torch.floor(q)
            f = q - i0
            w0 = (1 - f) * ((i0 >= 0) & (i0 <= n - 1))
            w1 = f * ((i0 >= -1) & (i0 <= n - 2))
            ws.append((w0, w1))
            bases.append(i0.clamp(-1, n - 1))
        # corner index = (base+da)*sY + ... ; clamp each coordinate so weight-0 corners stay in range
        out_idx, out_w = [], []
        for da in (0, 1):
            ia = (bases[0] + da).clamp(0, X - 1).long() * sY
            for db in (0, 1):
                ib = ia + (bases[1] + db).clamp(0, Y - 1).long() * sZ
                wab = ws[0][da] * ws[1][db]
                for dc in (0, 1):
                    out_idx.append(ib + (bases[2] + dc).clamp(0, Z - 1).long())
                    out_w.append(wab * ws[2][dc] * inside)
        yield ids, out_idx, out_w


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
    for b in range(B):
        flatvol = volume[b].reshape(-1).to(cdt)
        acc = out[b]
        for start, o, e, tlo, thi in ray_chunks(prm[b], kind, rows, cols, _SIDDON_CHUNK):
            part = torch.zeros(o.shape[0], device=volume.device, dtype=cdt)
            if method == "siddon":
                for ids, flat, seg in siddon_walk(o, e, tlo, thi, (X, Y, Z)):
                    part.index_add_(0, ids, seg * flatvol.take(flat))
            else:
                for ids, idx, w in trilinear_samples(o, e, tlo, thi, (X, Y, Z), float(dt_mm[b])):
                    val = sum(flatvol.take(ic) * wc for ic, wc in zip(idx, w))
                    part.index_add_(0, ids, val.sum(1))
            acc[start:start + o.shape[0]] = part
    return out.reshape(B, V, rows, cols)


def adjoint(proj: torch.Tensor, params: torch.Tensor, kind: str, shape, method: str,
            dt_mm: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """proj (B, V, rows, cols) -> (B, X, Y, Z): the exact transpose of :func:`forward`."""
    B, V, rows, cols = proj.shape
    X, Y, Z = shape
    prm, cdt = _setup(params, kind, rows, cols, out_dtype, proj.device)
    out = torch.zeros(B, X * Y * Z, device=proj.device, dtype=cdt)
    pf = proj.reshape(B, -1).to(cdt)
    for b in range(B):
        acc = out[b]
        for start, o, e, tlo, thi in ray_chunks(prm[b], kind, rows, cols, _SIDDON_CHUNK):
            y = pf[b, start:start + o.shape[0]]
            if method == "siddon":
                last, yl = None, None
                for ids, flat, seg in siddon_walk(o, e, tlo, thi, (X, Y, Z)):
                    if ids is not last:
                        last, yl = ids, y[ids]
                    acc.index_add_(0, flat, seg * yl)
            else:
                for ids, idx, w in trilinear_samples(o, e, tlo, thi, (X, Y, Z), float(dt_mm[b])):
                    yi = y[ids][:, None]
                    for ic, wc in zip(idx, w):
                        acc.index_add_(0, ic.reshape(-1), (wc * yi).reshape(-1))
    return out.reshape(B, X, Y, Z).to(out_dtype)
