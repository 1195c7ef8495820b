"""Voxel-driven weighted backprojection (the backprojection step of FDK / FBP): Triton kernel + torch reference.

Contract (shared by :func:`backproject_reference` and the Triton kernel, tested against each other):

* ``q``: filtered projections, ``(V, rows, cols)`` or ``(B, V, rows, cols)``, float32 or float64; every
  per-view / per-pixel factor (pre-weights, redundancy weights, angular step, filter scale) is already in.
* ``mats``: ``(V, 3, 4)`` per-view matrices (see :func:`view_matrices`) that map a voxel's *index-space*
  homogeneous coordinates ``(i, j, k, 1)`` to ``(col·w, row·w, w)``: the voxel centre projects onto
  detector pixel coordinates ``(row, col)`` (pixel centres at integers, as in :class:`xwin.geometry.Geometry`)
  and ``w`` is, for cone beam, the distance in mm from the source to the voxel measured along the detector
  normal (``w ≡ 1`` for parallel beam).
* output ``(X, Y, Z)`` / ``(B, X, Y, Z)``: for every voxel ``Σ_v bilinear(q[v], row, col) · g(w)`` with
  ``g(w) = 1/w²`` when ``distance_weight`` (the FDK weight) and ``g = 1`` otherwise. Bilinear interpolation
  of the pixel centres with zero padding outside the detector; views in which the voxel lies at or behind
  the source plane (``w ≤ 0``) contribute nothing.

The Triton kernel lives in :mod:`xwin.kernels.fdk` (its ahead-of-time targets are declared there, like the
projector kernels'). The matrices make it work for any vector geometry; whether the *weights* in ``q`` are
right for that geometry is the caller's business (FDK's are derived for a circular orbit, see :mod:`xwin.reconstruct.filters`).

Two torch implementations: :func:`backproject_reference` (any geometry: one 2-D ``grid_sample`` over a mosaic
of all views) and :func:`backproject_separable`, the CPU fast path for the common case of a circular orbit
whose rotation axis is a volume index axis ``a`` and whose detector rows are perpendicular to it. Then every
matrix has ``M[0, a] = M[2, a] = 0``: a voxel's column and ``w`` do not change along ``a`` and its row is
affine in the index along ``a``. So each view is interpolated along ``u`` once per line of voxels (a
two-tap ``embedding_bag``) and then along ``v`` for the whole line at once (a 1-D linear interpolation
done by ``grid_sample`` on a one-row image per line) - the same zero-padded bilinear value, 3-4x faster on
one CPU thread (measured on the benchmarks' sizes: about 6 ns per voxel and view here). For parallel beam a
voxel's row is the same in every view, so the views are summed before the row interpolation (another
~6x). :func:`separable_axis` decides (a drift test in pixels); :func:`fdk_backproject` uses the fast path
on the torch backend whenever it applies; the Triton kernel (GPU) is the general one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from xwin.errors import XwinError
from xwin.geometry import Geometry

from ._backend import resolve_backend
from ._prep import ProjectorInputError, affine_batch, as_batched, check_shape

__all__ = ["view_matrices", "fdk_backproject", "backproject_reference", "backproject_separable", "separable_axis",
           "backproject_triton", "FDKBackprojectError"]

_INT32_MAX = 2**31 - 1


class FDKBackprojectError(XwinError):
    """Bad input to the FDK backprojection (shapes, dtypes, devices)."""


# ---------------------------------------------------------------------------------------- geometry -> matrices

def view_matrices(geometry: Geometry, affine=None) -> torch.Tensor:
    """Per-view (V, 3, 4) float64 matrices: index-space ``(i, j, k, 1)`` → ``(col·w, row·w, w)``.

    Cone beam: the ray source→voxel meets the detector plane at ``P``; ``P − center = a·u + b·v`` gives
    ``col = (cols−1)/2 + a``, ``row = (rows−1)/2 + b`` (a dual basis of u, v handles non-orthogonal
    detectors) and ``w = n·(X − S)`` with ``n`` the unit detector normal pointing away from the source.
    Parallel beam: ``P`` is where the line through the voxel along ``direction`` meets the detector; ``w = 1``.
    """
    if not isinstance(geometry, Geometry):
        raise FDKBackprojectError(f"geometry must be an xwin.geometry.Geometry, got {type(geometry).__name__}")
    g = geometry.to("cpu")
    try:
        A = affine_batch(affine).detach()
    except ProjectorInputError as exc:
        raise FDKBackprojectError(str(exc)) from None
    if A.shape[0] != 1:
        raise FDKBackprojectError(f"affine must be (4, 4), got {tuple(A.shape)}")
    A = A[0]
    C, u, v = g.center, g.u, g.v
    V = g.num_views
    # dual basis (u*, v*) of the detector plane: u*·u = 1, u*·v = 0, v*·u = 0, v*·v = 1, both in span(u, v)
    G = torch.stack([torch.stack([(u * u).sum(1), (u * v).sum(1)], -1),
                     torch.stack([(v * u).sum(1), (v * v).sum(1)], -1)], -2)            # (V,2,2)
    Gi = torch.linalg.inv(G)
    us = Gi[:, 0, 0, None] * u + Gi[:, 0, 1, None] * v
    vs = Gi[:, 1, 0, None] * u + Gi[:, 1, 1, None] * v
    n = torch.cross(u, v, dim=1)
    n = n / n.norm(dim=1, keepdim=True)
    c0, r0 = (g.cols - 1) / 2.0, (g.rows - 1) / 2.0
    dot = lambda a, b: (a * b).sum(1)
    M = torch.zeros(V, 3, 4, dtype=torch.float64)
    if g.kind == "cone":
        S = g.source
        n = n * torch.sign(dot(n, C - S))[:, None]                      # point from source to detector
        h = dot(n, C - S)                                               # source-detector distance (mm)
        # w(X) = n·X − n·S ;  col·w = (c0 + u*·(S−C))·w + h·u*·(X − S)
        M[:, 2, :3] = n
        M[:, 2, 3] = -dot(n, S)
        for row, (dual, off) in enumerate(((us, c0), (vs, r0))):
            k = off + dot(dual, S - C)
            M[:, row, :3] = k[:, None] * n + h[:, None] * dual
            M[:, row, 3] = -k * dot(n, S) - h * dot(dual, S)
    else:
        d = g.direction / g.direction.norm(dim=1, keepdim=True)
        nd = dot(n, d)
        # P = X + t d with t = n·(C − X)/(n·d);  a = u*·(X − C) + (u*·d)(n·(C − X))/(n·d)
        for row, (dual, off) in enumerate(((us, c0), (vs, r0))):
            k = dot(dual, d) / nd
            lin = dual - k[:, None] * n
            M[:, row, :3] = lin
            M[:, row, 3] = off - dot(lin, C)
        M[:, 2, 3] = 1.0
    return M @ A                                                        # compose with voxel index -> world


# ---------------------------------------------------------------------------------------- checks

def _check(q: torch.Tensor, mats: torch.Tensor, volume_shape: Sequence[int]):
    q4, squeeze = as_batched(q, "projections", "(V, rows, cols)", (torch.float32, torch.float64), FDKBackprojectError)
    mats = torch.as_tensor(mats)
    if mats.ndim != 3 or mats.shape[1:] != (3, 4) or mats.shape[0] != q4.shape[1]:
        raise FDKBackprojectError(f"mats must be (V, 3, 4) with V = {q4.shape[1]} views, got {tuple(mats.shape)}")
    if not torch.isfinite(mats).all():
        raise FDKBackprojectError("mats contain NaN or Inf")
    return q4, squeeze, mats, check_shape(volume_shape, FDKBackprojectError)


# ---------------------------------------------------------------------------------------- torch reference

def backproject_reference(q: torch.Tensor, mats: torch.Tensor, volume_shape: Sequence[int], *,
                          distance_weight: bool = True, progress=None, budget: int = 1 << 21) -> torch.Tensor:
    """Plain-torch implementation of the contract (any device), built on ``grid_sample``.

    The views are laid out as tiles of one mosaic image, each tile the projection with a one-pixel zero
    border; voxel centres are mapped through all matrices with one GEMM per block of voxels, clamped into
    their tile's border (so nothing bleeds between tiles) and sampled with one bilinear ``grid_sample``
    (align_corners=True): exactly the zero-padded bilinear interpolant of the contract. ``budget`` bounds
    voxels × views per block (memory); ``progress(n)`` is called with the (fractional) number of views done.
    """
    import torch.nn.functional as F

    q4, squeeze, mats, (X, Y, Z) = _check(q, mats, volume_shape)
    B, V, R, C = q4.shape
    dev, dt = q4.device, q4.dtype
    TC = int(math.ceil(math.sqrt(V)))
    TR = int(math.ceil(V / TC))
    H, W = TR * (R + 2), TC * (C + 2)
    mosaic = torch.zeros(B, TR * TC, R + 2, C + 2, device=dev, dtype=dt)
    mosaic[:, :V, 1:-1, 1:-1] = q4
    mosaic = mosaic.view(B, TR, TC, R + 2, C + 2).permute(0, 1, 3, 2, 4).reshape(1, B, H, W)
    v = torch.arange(V, device=dev)
    sx, sy = 2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)
    offx = ((v % TC) * (C + 2) + 1).to(dt) * sx - 1.0                       # (V,) tile origin, normalised
    offy = ((v // TC) * (R + 2) + 1).to(dt) * sy - 1.0
    mt = mats.to(device=dev, dtype=dt).permute(2, 0, 1).reshape(4, V * 3).contiguous()   # (4, 3V)
    nvox = X * Y * Z
    out = torch.zeros(B, nvox, device=dev, dtype=dt)
    nchunk = max(1, min(nvox, budget // V))
    for n0 in range(0, nvox, nchunk):
        n1 = min(nvox, n0 + nchunk)
        flat = torch.arange(n0, n1, device=dev)
        ijk = torch.stack([flat // (Y * Z), (flat // Z) % Y, flat % Z], 1).to(dt)
        h = torch.addmm(mt[3], ijk, mt[:3]).view(n1 - n0, V, 3)            # (Nc, V, 3)
        w = h[..., 2]
        winv = w.reciprocal()
        behind = w <= 0
        any_behind = bool(behind.any())                                      # voxel at/behind a source
        if any_behind:
            winv = winv.masked_fill(behind, 0.0)
        grid = torch.empty(1, n1 - n0, V, 2, device=dev, dtype=dt)
        col = torch.mul(h[..., 0], winv).clamp_(-1.0, float(C))
        row = torch.mul(h[..., 1], winv).clamp_(-1.0, float(R))
        if any_behind:
            col.masked_fill_(behind, -1.0)
        torch.add(offx, col, alpha=sx, out=grid[0, ..., 0])
        torch.add(offy, row, alpha=sy, out=grid[0, ..., 1])
        vals = F.grid_sample(mosaic, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        if distance_weight:
            out[:, n0:n1] = (vals * winv.square_()).sum(-1)                 # vals: (B, Nc, V)
        else:
            out[:, n0:n1] = vals.sum(-1)                                    # behind-source taps sit on zeros
        if progress is not None:
            progress(V * (n1 - n0) / nvox)
    out = out.reshape(B, X, Y, Z)
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------- separable fast path

_VIEWS_PER_BLOCK = 16       # views per grid_sample call when the budget allows (their sum is one reduction)
_TWO_TAPS = torch.tensor([0, 1])
SEPARABLE_TOL_PX = 1e-5     # largest column / row drift (pixels) along the line axis that the fast path may ignore


def separable_axis(mats: torch.Tensor, volume_shape: Sequence[int], rows: int, cols: int, *,
                   tol_px: float = SEPARABLE_TOL_PX) -> Optional[int]:
    """The volume index axis ``a`` along which, in every view, a voxel's detector column and its ``w`` stay
    constant (so its row is affine in the index along ``a``), or None.

    Test per view: ignoring ``M[0, a]`` and ``M[2, a]`` moves a voxel's column by at most
    ``(|M[0,a]| + (max(rows, cols) + 1)·|M[2,a]|)·(size_a − 1)/|w₀|`` pixels (``w₀``: ``w`` at the volume's
    centre), and that must be ≤ ``tol_px`` (1e-5 px, below float32 rounding of the general path). Exact
    zeros pass for any ``w₀``. Of several axes that pass, the longest wins (fewer, longer lines)."""
    M = torch.as_tensor(mats).detach().to("cpu", torch.float64)
    shape = [int(s) for s in volume_shape]
    centre = torch.tensor([(s - 1) / 2.0 for s in shape] + [1.0], dtype=torch.float64)
    w0 = (M[:, 2] @ centre).abs()
    best = None
    for a in range(3):
        drift = (M[:, 0, a].abs() + (max(rows, cols) + 1) * M[:, 2, a].abs()) * (shape[a] - 1)
        exact = (M[:, 0, a] == 0) & (M[:, 2, a] == 0)
        if bool((exact | (drift <= tol_px * w0)).all()) and (best is None or shape[a] > shape[best]):
            best = a
    return best


def _separable_taps(h: torch.Tensor, slope: torch.Tensor, view_base: torch.Tensor, C: int, sx: float,
                    distance_weight: bool, dt: torch.dtype, length: int):
    """From ``h`` = (views, 3, lines) float64 ``M·(p, q, 0, 1)`` of every line's first voxel: the two table rows and
    weights of step 1 (distance weight folded in), step 2's grid coefficients ``[x₀, dx/dl]`` (rows
    normalised for ``grid_sample``), each flattened view-major, and whether any grid may leave ±1e6."""
    w = h[:, 2]
    ahead = w > 0
    winv = torch.where(ahead, w, 1.0).reciprocal_().mul_(ahead)            # 0 at / behind the source
    col = (h[:, 0] * winv).clamp_(-1.0, float(C)).add_(1.0)                # table column, in [0, C + 1]
    c0 = col.floor().clamp_(max=float(C))
    wt = winv.square() if distance_weight else ahead.to(torch.float64)
    fw = col.sub_(c0).mul_(wt)                                              # frac·weight (col reused)
    taps = (c0.long().add_(view_base[:, None]).unsqueeze(-1) + _TWO_TAPS.to(h.device)).view(-1)
    psw = torch.stack([wt.sub_(fw), fw], -1).to(dt).view(-1, 2)
    # row(l) = (h1 + slope·l)/w ; grid x = (row + 1)·sx − 1 (align_corners=True on rows −1 .. R)
    alpha = (h[:, 1] * winv).add_(1.0).mul_(sx).sub_(1.0)
    beta = winv.mul_(slope[:, None]).mul_(sx)
    coef = torch.stack([alpha, beta], -1).clamp_(-1e15, 1e15).to(dt).view(-1, 2)
    bound = coef.abs().amax(0).tolist()
    return taps, psw, coef, bound[0] + bound[1] * length > 1e6


def _line_starts(p0: int, p1: int, q0: int, q1: int, dev) -> torch.Tensor:
    """(3, n) float64 ``(p, q, 1)`` of the lines ``p0 ≤ p < p1``, ``q0 ≤ q < q1`` (p-major)."""
    ip = torch.arange(p0, p1, device=dev, dtype=torch.float64)
    iq = torch.arange(q0, q1, device=dev, dtype=torch.float64)
    return torch.stack([ip.repeat_interleave(q1 - q0), iq.repeat(p1 - p0), torch.ones_like(ip).repeat(q1 - q0)])


def _shared_rows(Md: torch.Tensor, shape) -> bool:
    """Parallel beam (``w`` ≡ const) with every voxel on the same detector row in every view (a circular orbit
    about the line axis): then step 2 is the same for all views and runs once on their sum."""
    if bool((Md[:, 2, :3] != 0).any()) or bool((Md[:, 2, 3] <= 0).any()):
        return False
    rows = Md[:, 1] / Md[:, 2, 3:4]                                         # row of (i, j, k, 1), per view
    ext = torch.tensor([max(s - 1, 1) for s in shape] + [1.0], dtype=torch.float64, device=Md.device)
    return float(((rows - rows[:1]).abs() * ext).sum(1).max()) <= SEPARABLE_TOL_PX


def _backproject_shared_rows(tab, Mo, slope, view_base, B, V, R, C, axes, out, out_lines, sx, basis, distance_weight,
                             budget, progress, squeeze):
    """:func:`backproject_separable` when :func:`_shared_rows`: step 1 sums every view's interpolated column
    in one ``embedding_bag`` per line (bags of 2·views taps), step 2 samples that sum once per line."""
    import torch.nn.functional as F

    pa, qa, axis = axes
    P, Q, L = out_lines.shape[1:]
    dev, dt = tab.device, tab.dtype
    lines = max(1, budget // (V * 8 + B * (R + 2) + 2 * L + B * L))
    for p0 in range(0, P, max(1, lines // Q)):
        p1 = min(P, p0 + max(1, lines // Q))
        for q0 in range(0, Q, min(Q, lines)):
            q1 = min(Q, q0 + min(Q, lines))
            n = (p1 - p0) * (q1 - q0)
            pq1 = _line_starts(p0, p1, q0, q1, dev)
            taps, psw, coef, far = _separable_taps(Mo @ pq1, slope, view_base, C, sx, distance_weight, dt, L)
            taps = taps.view(V, n, 2).transpose(0, 1).reshape(-1)           # line-major: one bag per line
            psw = psw.view(V, n, 2).transpose(0, 1).reshape(-1)
            line = F.embedding_bag(taps, tab, torch.arange(0, 2 * V * n, 2 * V, device=dev), per_sample_weights=psw,
                                   mode="sum")                               # (n, B·(R+2)): Σ over views
            grid = (coef[:n] @ basis).view(n, 1, L, 2)                      # view 0's rows are every view's
            if far:
                grid.clamp_(-2.0, 2.0)
            vals = F.grid_sample(line.view(n, B, 1, R + 2), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=True)
            out_lines[:, p0:p1, q0:q1].copy_(vals.view(p1 - p0, q1 - q0, B, L).permute(2, 0, 1, 3))
            if progress is not None:
                progress(V * n / (P * Q))
    return out[0] if squeeze else out


def backproject_separable(q: torch.Tensor, mats: torch.Tensor, volume_shape: Sequence[int], *, axis: Optional[int] = None,
                          distance_weight: bool = True, progress=None, budget: int = 1 << 21) -> torch.Tensor:
    """The contract for geometries where :func:`separable_axis` finds an axis (else FDKBackprojectError).

    The voxels are lines along the axis ``a``; ``n`` indexes a line (its two other indices), ``l`` the
    position on it. Per view: ``w`` and the column ``c`` depend on ``n`` only, the row is ``α_n + β_n·l``.

    1. Along ``u``: the line's detector column, ``(1 − f)·q[:, c₀] + f·q[:, c₀ + 1]`` times the distance
       weight ``1/w²``, for all rows at once - one ``embedding_bag`` (two rows of a table holding every view's
       columns, transposed, with a zero column and a zero row on each side) per line and view.
    2. Along ``v``: that interpolated column sampled at rows ``α_n + β_n·l`` for the whole line - a
       ``grid_sample`` on a one-row image per (line, view), whose grid is one small GEMM.

    Lines and views are processed in blocks of at most ``budget`` elements of working memory (plus the
    output and one transposed copy of ``q``); ``progress(n)`` as in :func:`backproject_reference`.
    """
    import torch.nn.functional as F

    q4, squeeze, mats, (X, Y, Z) = _check(q, mats, volume_shape)
    B, V, R, C = q4.shape
    dev, dt = q4.device, q4.dtype
    if axis is None:
        axis = separable_axis(mats, (X, Y, Z), R, C)
    if axis not in (0, 1, 2):
        raise FDKBackprojectError("this geometry has no separable axis (tilted detector or rotation axis not along "
                                  "a volume index axis): use backproject_reference")
    shape = (X, Y, Z)
    pa, qa = [d for d in range(3) if d != axis]
    P, Q, L = shape[pa], shape[qa], shape[axis]
    Md = mats.to(device=dev, dtype=torch.float64)
    Mo = Md[:, :, [pa, qa, 3]]                                              # (V, 3, 3): the line's (p, q, 1)
    slope = Md[:, 1, axis]                                                  # row·w per step along the line
    # table row v·(C+2) + c + 1 = column c of view v (all batch items, all rows), zero padded on every side
    tab = torch.zeros(V, C + 2, B, R + 2, device=dev, dtype=dt)
    tab[:, 1:C + 1, :, 1:R + 1] = q4.permute(1, 3, 0, 2)
    tab = tab.view(V * (C + 2), B * (R + 2))
    sx = 2.0 / (R + 1)                                                      # grid_sample's normalised x per row
    basis = torch.zeros(2, L, 2, device=dev, dtype=dt)                      # grid = [α', β'] @ basis: (x, y = 0)
    basis[0, :, 0] = 1.0
    basis[1, :, 0] = torch.arange(L, device=dev, dtype=dt)
    basis = basis.view(2, 2 * L)
    out = torch.zeros(B, X, Y, Z, device=dev, dtype=dt)
    out_lines = out.permute(0, 1 + pa, 1 + qa, 1 + axis)                     # (B, P, Q, L) view
    per = B * (R + 2) + 2 * L + 2 * B * L                                   # working elements per (line, view)
    lines = max(1, budget // (per * min(V, _VIEWS_PER_BLOCK)))              # lines per block
    if Q <= lines:
        qb, pb = Q, max(1, min(P, lines // Q))
    else:
        qb, pb = lines, 1
    nb = pb * qb
    vb = max(1, min(V, budget // (nb * per)))                               # views per grid_sample
    vg = min(V, vb * max(1, budget // (16 * nb * vb)))                      # views per geometry step
    view_base = torch.arange(V, device=dev) * (C + 2)
    if _shared_rows(Md, shape):
        return _backproject_shared_rows(tab, Mo, slope, view_base, B, V, R, C, (pa, qa, axis), out, out_lines, sx, basis,
                                        distance_weight, budget, progress, squeeze)
    gbuf = torch.empty(vb * nb, 2 * L, device=dev, dtype=dt)
    offsets = torch.arange(0, 2 * vb * nb, 2, device=dev)
    for p0 in range(0, P, pb):
        p1 = min(P, p0 + pb)
        for q0 in range(0, Q, qb):
            q1 = min(Q, q0 + qb)
            n = (p1 - p0) * (q1 - q0)
            pq1 = _line_starts(p0, p1, q0, q1, dev)
            acc = torch.zeros(n, B, L, device=dev, dtype=dt)
            for g0 in range(0, V, vg):
                taps, psw, coef, far = _separable_taps(Mo[g0:g0 + vg] @ pq1, slope[g0:g0 + vg], view_base[g0:g0 + vg],
                                                       C, sx, distance_weight, dt, L)
                for v0 in range(0, psw.shape[0], vb * n):
                    v1 = min(psw.shape[0], v0 + vb * n)
                    line = F.embedding_bag(taps[2 * v0:2 * v1], tab, offsets[:v1 - v0], per_sample_weights=psw[v0:v1].view(-1),
                                           mode="sum")
                    grid = torch.mm(coef[v0:v1], basis, out=gbuf[:v1 - v0]).view(-1, 1, L, 2)
                    if far:
                        grid.clamp_(-2.0, 2.0)                               # far off the detector: keep it finite
                    vals = F.grid_sample(line.view(-1, B, 1, R + 2), grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=True)                 # (views·n, B, 1, L)
                    if v1 - v0 == n:
                        acc += vals.view(n, B, L)
                    else:
                        acc += vals.view(-1, n, B, L).sum(0)
            out_lines[:, p0:p1, q0:q1].copy_(acc.view(p1 - p0, q1 - q0, B, L).permute(2, 0, 1, 3))
            if progress is not None:
                progress(V * n / (P * Q))
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------- Triton kernel

def backproject_triton(q: torch.Tensor, mats: torch.Tensor, volume_shape: Sequence[int], *,
                       distance_weight: bool = True) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``) with the same contract."""
    q4, squeeze, mats, (X, Y, Z) = _check(q, mats, volume_shape)
    resolve_backend("triton", q4.device, FDKBackprojectError)
    import triton
    import triton.language as tl

    from .fdk import BLOCK, NUM_WARPS, fdk_backproject_kernel

    B, V, R, C = q4.shape
    if B > 65535:
        raise FDKBackprojectError(f"at most 65535 volumes per launch, got B={B}")
    dt = q4.dtype
    tdt = tl.float64 if dt == torch.float64 else tl.float32
    qc = q4.contiguous()
    m = mats.to(device=q4.device, dtype=dt).contiguous()
    nvox = X * Y * Z
    out = torch.empty(B, X, Y, Z, device=q4.device, dtype=dt)
    int64 = max(B * nvox, B * V * R * C) + BLOCK > _INT32_MAX
    grid = (triton.cdiv(nvox, BLOCK), B)
    fdk_backproject_kernel[grid](qc, m, out, V, R, C, X, Y, Z, DIST_WEIGHT=bool(distance_weight), DTYPE=tdt,
                                 INT64=int64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out[0] if squeeze else out


def fdk_backproject(q: torch.Tensor, mats: torch.Tensor, volume_shape: Sequence[int], *,
                    distance_weight: bool = True, backend: str = "auto", progress=None) -> torch.Tensor:
    """Weighted voxel-driven backprojection; ``backend`` "auto" (Triton for CUDA tensors, else torch),
    "triton" or "torch" (the one resolver of :mod:`xwin.kernels._backend`). See the module docstring."""
    dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if resolve_backend(backend, dev, FDKBackprojectError) == "triton":
        out = backproject_triton(q, mats, volume_shape, distance_weight=distance_weight)
        if progress is not None:
            progress(q.shape[-3])
        return out
    q4, _, m, shape = _check(q, mats, volume_shape)
    axis = separable_axis(m, shape, q4.shape[-2], q4.shape[-1])
    if axis is not None:
        return backproject_separable(q, mats, volume_shape, axis=axis, distance_weight=distance_weight,
                                     progress=progress)
    return backproject_reference(q, mats, volume_shape, distance_weight=distance_weight, progress=progress)

