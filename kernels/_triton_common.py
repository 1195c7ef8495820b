"""Device functions shared by the Triton projector kernels (ray set-up and box clipping).

They mirror ``kernels/reference.py`` operation for operation (see ``kernels/_prep.py`` for the ray
parametrisation), so that the kernels and the reference compute the same operator.
"""

import itertools

import triton
import triton.language as tl

from . import layout

INF = tl.constexpr(float("inf"))
# the ray record's offsets (kernels/layout.py), as constexprs the compiler accepts
RAY_FIRST = tl.constexpr(layout.RAY_FIRST)
RAY_CENTER = tl.constexpr(layout.RAY_CENTER)
RAY_U = tl.constexpr(layout.RAY_U)
RAY_V = tl.constexpr(layout.RAY_V)
RAY_M = tl.constexpr(layout.RAY_M)
RAY_RECORD = tl.constexpr(layout.RAY_RECORD)


@triton.jit
def ray_setup(params_ptr, b, v, V, rr, cc, ROWS, COLS, IS_CONE: tl.constexpr, DTYPE: tl.constexpr):
    """Index-space origin o, direction e (per mm) and parameter range [tlo, thi] of the pixels (rr, cc)."""
    base = params_ptr + (b * V + v) * RAY_RECORD
    f0 = tl.load(base + RAY_FIRST + 0).to(DTYPE)
    f1 = tl.load(base + RAY_FIRST + 1).to(DTYPE)
    f2 = tl.load(base + RAY_FIRST + 2).to(DTYPE)
    cx = tl.load(base + RAY_CENTER + 0).to(DTYPE)
    cy = tl.load(base + RAY_CENTER + 1).to(DTYPE)
    cz = tl.load(base + RAY_CENTER + 2).to(DTYPE)
    ux = tl.load(base + RAY_U + 0).to(DTYPE)
    uy = tl.load(base + RAY_U + 1).to(DTYPE)
    uz = tl.load(base + RAY_U + 2).to(DTYPE)
    vx = tl.load(base + RAY_V + 0).to(DTYPE)
    vy = tl.load(base + RAY_V + 1).to(DTYPE)
    vz = tl.load(base + RAY_V + 2).to(DTYPE)
    r = rr.to(DTYPE) - (ROWS - 1) / 2
    c = cc.to(DTYPE) - (COLS - 1) / 2
    px = cx + c * ux + r * vx
    py = cy + c * uy + r * vy
    pz = cz + c * uz + r * vz
    if IS_CONE:
        m00 = tl.load(base + RAY_M + 0).to(DTYPE)
        m01 = tl.load(base + RAY_M + 1).to(DTYPE)
        m02 = tl.load(base + RAY_M + 2).to(DTYPE)
        m10 = tl.load(base + RAY_M + 3).to(DTYPE)
        m11 = tl.load(base + RAY_M + 4).to(DTYPE)
        m12 = tl.load(base + RAY_M + 5).to(DTYPE)
        m20 = tl.load(base + RAY_M + 6).to(DTYPE)
        m21 = tl.load(base + RAY_M + 7).to(DTYPE)
        m22 = tl.load(base + RAY_M + 8).to(DTYPE)
        dx = px - f0
        dy = py - f1
        dz = pz - f2
        wx = m00 * dx + m01 * dy + m02 * dz
        wy = m10 * dx + m11 * dy + m12 * dz
        wz = m20 * dx + m21 * dy + m22 * dz
        length = tl.sqrt(wx * wx + wy * wy + wz * wz)
        ex = dx / length
        ey = dy / length
        ez = dz / length
        ox = px * 0 + f0
        oy = py * 0 + f1
        oz = pz * 0 + f2
        tlo = length * 0
        thi = length
    else:
        ex = px * 0 + f0
        ey = py * 0 + f1
        ez = pz * 0 + f2
        ox = px
        oy = py
        oz = pz
        tlo = px * 0 - INF
        thi = px * 0 + INF
    return ox, oy, oz, ex, ey, ez, tlo, thi


@triton.jit
def axis_range(o, e, lo, hi, UPPER_OPEN: tl.constexpr):
    """Parameter interval of q = o + t e inside lo ≤ q ≤ hi on one axis (same rule as reference.clip)."""
    nz = e != 0
    safe = tl.where(nz, e, 1.0)
    ta = (lo - o) / safe
    tb = (hi - o) / safe
    if UPPER_OPEN:
        inside = (o >= lo) & (o < hi)
    else:
        inside = (o > lo) & (o < hi)
    tmin = tl.where(nz, tl.minimum(ta, tb), tl.where(inside, -INF, INF))
    tmax = tl.where(nz, tl.maximum(ta, tb), tl.where(inside, INF, -INF))
    return tmin, tmax


@triton.jit
def clip_box(ox, oy, oz, ex, ey, ez, lo, NX, NY, NZ, hi_off, tlo, thi, UPPER_OPEN: tl.constexpr):
    """Clip the rays to the box [lo, N + hi_off] on every axis; returns t0, t1 (miss: t1 ≤ t0)."""
    ax0, ax1 = axis_range(ox, ex, lo, NX + hi_off, UPPER_OPEN)
    ay0, ay1 = axis_range(oy, ey, lo, NY + hi_off, UPPER_OPEN)
    az0, az1 = axis_range(oz, ez, lo, NZ + hi_off, UPPER_OPEN)
    t0 = tl.maximum(tlo, tl.maximum(ax0, tl.maximum(ay0, az0)))
    t1 = tl.minimum(thi, tl.minimum(ax1, tl.minimum(ay1, az1)))
    return t0, t1


@triton.jit
def pixel_tile(pid, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row/column indices of the BLOCK_R × BLOCK_C detector tile handled by program ``pid``."""
    n_tc = tl.cdiv(COLS, BLOCK_C)
    tr = pid // n_tc
    tc = pid % n_tc
    offs = tl.arange(0, BLOCK_R * BLOCK_C)
    rr = tr * BLOCK_R + offs // BLOCK_C
    cc = tc * BLOCK_C + offs % BLOCK_C
    return rr, cc, (rr < ROWS) & (cc < COLS)


@triton.jit
def tile_rays(params_ptr, V, ROWS, COLS, NX, NY, NZ, IS_CONE: tl.constexpr, DTYPE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The common start of a projector-style program: its (b, v), tile pixels (rr, cc, in-detector mask), the
    rays' o, e, [tlo, thi] (``ray_setup``), a zero vector and the sizes as DTYPE vectors (sizes equal to 1
    arrive as Python constexprs under Triton's JIT specialisation: no ``.to()`` on them)."""
    pid = tl.program_id(0)
    v = tl.program_id(1)
    b = tl.program_id(2)
    rr, cc, pmask = pixel_tile(pid, ROWS, COLS, BLOCK_R, BLOCK_C)
    ox, oy, oz, ex, ey, ez, tlo, thi = ray_setup(params_ptr, b, v, V, rr, cc, ROWS, COLS, IS_CONE, DTYPE)
    zero = tl.zeros([BLOCK_R * BLOCK_C], DTYPE)
    return b, v, rr, cc, pmask, ox, oy, oz, ex, ey, ez, tlo, thi, zero, zero + NX, zero + NY, zero + NZ


@triton.jit
def reorigin(pmask, t0, t1, ox, oy, oz, ex, ey, ez):
    """Which rays meet the box, their length L in it (0 if not), t0 (0 if not) and the entry point."""
    hit = pmask & (t1 > t0)
    L = tl.where(hit, t1 - t0, 0.0)
    t0 = tl.where(hit, t0, 0.0)
    return hit, L, t0, ox + t0 * ex, oy + t0 * ey, oz + t0 * ez


@triton.jit
def flat_offsets(b, v, V, rr, cc, ROWS, COLS, NX, NY, NZ, INT64: tl.constexpr):
    """Offset of volume b's first voxel, and of the pixels (rr, cc) of view v, in int64 when asked."""
    if INT64:
        vol_base = b.to(tl.int64) * NX * NY * NZ
        pix = ((b.to(tl.int64) * V + v) * ROWS + rr) * COLS + cc
    else:
        vol_base = b * NX * NY * NZ
        pix = ((b * V + v) * ROWS + rr) * COLS + cc
    return vol_base, pix


@triton.jit
def voxel_offset(vol_base, ix, iy, iz, NY, NZ, INT64: tl.constexpr):
    """Flat offset of voxel (ix, iy, iz) (float or int coordinates) in a C-contiguous (X, Y, Z) volume."""
    if INT64:
        off = vol_base + ix.to(tl.int64) * NY * NZ + iy.to(tl.int64) * NZ + iz.to(tl.int64)
    else:
        off = vol_base + ix.to(tl.int32) * (NY * NZ) + iy.to(tl.int32) * NZ + iz.to(tl.int32)
    return off


def projector_aot_specs(name: str, fn, extra_ptrs=()):
    """Ahead-of-time variants of a projector kernel (cone/parallel × forward/adjoint × storage dtype ×
    index width), in the format of kernels/aot.py; ``extra_ptrs`` are further pointer arguments after
    ``proj_ptr`` (in the compute dtype)."""
    ints = {k: "i32" for k in ("V", "ROWS", "COLS", "NX", "NY", "NZ")}
    specs = []
    for cone, adj, (vt, dt), i64 in itertools.product((True, False), (False, True),
                                                       (("*fp32", tl.float32), ("*fp16", tl.float32),
                                                        ("*bf16", tl.float32), ("*fp64", tl.float64)),
                                                       (False, True)):
        if adj and vt in ("*fp16", "*bf16"):
            continue            # the adjoint accumulates into a float32/float64 buffer
        ct = "*fp64" if dt == tl.float64 else "*fp32"
        sig = {"vol_ptr": vt, "params_ptr": ct, "proj_ptr": ct, **{p: ct for p in extra_ptrs}, **ints}
        specs.append(dict(name=f"{name} cone={cone} adjoint={adj} vol={vt} int64={i64}", fn=fn, signature=sig,
                          constexprs=dict(IS_CONE=cone, ADJOINT=adj, DTYPE=dt, INT64=i64, BLOCK_R=8, BLOCK_C=16)))
    return specs
