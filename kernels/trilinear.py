"""Triton kernel: trilinear projection (midpoint rule along the ray) and its exact adjoint.

One program handles a BLOCK_R × BLOCK_C tile of detector pixels of one (volume b, view v) pair. Each lane
clips its ray to the support (−1, N) of the zero-padded trilinear interpolant and samples it at
``t = (k + ½)·dt`` from the entry point, exactly like ``reference.trilinear_samples``. Forward gathers the
8 corners of every sample; the adjoint scatters ``weight × dt × projection value`` to them with atomics.
"""

import triton
import triton.language as tl

from ._triton_common import projector_aot_specs, clip_box, flat_offsets, reorigin, tile_rays, voxel_offset


@triton.jit
def _corner(vol_ptr, base, ix, iy, iz, w, ok, NY, NZ, y, acc, ADJOINT: tl.constexpr, INT64: tl.constexpr,
            DTYPE: tl.constexpr):
    off = voxel_offset(base, ix, iy, iz, NY, NZ, INT64)
    if ADJOINT:
        tl.atomic_add(vol_ptr + off, w * y, mask=ok & (w != 0))
    else:
        acc += w * tl.load(vol_ptr + off, mask=ok, other=0.0).to(DTYPE)
    return acc


@triton.jit
def trilinear_kernel(vol_ptr, params_ptr, proj_ptr, dt_ptr, V, ROWS, COLS, NX, NY, NZ,
                     IS_CONE: tl.constexpr, ADJOINT: tl.constexpr, DTYPE: tl.constexpr, INT64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, rr, cc, pmask, ox, oy, oz, ex, ey, ez, tlo, thi, zero, fnx, fny, fnz = tile_rays(
        params_ptr, V, ROWS, COLS, NX, NY, NZ, IS_CONE, DTYPE, BLOCK_R, BLOCK_C)
    dt = tl.load(dt_ptr + b).to(DTYPE)
    t0, t1 = clip_box(ox, oy, oz, ex, ey, ez, -1.0, fnx, fny, fnz, 0.0, tlo, thi, False)
    hit, L, t0, px, py, pz = reorigin(pmask, t0, t1, ox, oy, oz, ex, ey, ez)
    nsamp = tl.where(hit, tl.ceil(L / dt).to(tl.int32) + 1, 0)
    kmax = tl.max(nsamp, axis=0)
    vol_base, pix = flat_offsets(b, v, V, rr, cc, ROWS, COLS, NX, NY, NZ, INT64)
    if ADJOINT:
        y = tl.load(proj_ptr + pix, mask=hit, other=0.0).to(DTYPE) * dt
    else:
        y = L * 0
    acc = L * 0
    for k in range(0, kmax):
        t = (k + 0.5) * dt
        inside = hit & (t < L)
        qx = px + t * ex
        qy = py + t * ey
        qz = pz + t * ez
        x0 = tl.floor(qx)
        y0 = tl.floor(qy)
        z0 = tl.floor(qz)
        fx = qx - x0
        fy = qy - y0
        fz = qz - z0
        # per-axis weights of the lower/upper corner, zero outside the volume (zero padding)
        okx0 = (x0 >= 0) & (x0 <= fnx - 1)
        okx1 = (x0 >= -1) & (x0 <= fnx - 2)
        oky0 = (y0 >= 0) & (y0 <= fny - 1)
        oky1 = (y0 >= -1) & (y0 <= fny - 2)
        okz0 = (z0 >= 0) & (z0 <= fnz - 1)
        okz1 = (z0 >= -1) & (z0 <= fnz - 2)
        wx0 = tl.where(okx0, 1 - fx, 0.0)
        wx1 = tl.where(okx1, fx, 0.0)
        wy0 = tl.where(oky0, 1 - fy, 0.0)
        wy1 = tl.where(oky1, fy, 0.0)
        wz0 = tl.where(okz0, 1 - fz, 0.0)
        wz1 = tl.where(okz1, fz, 0.0)
        xa = x0
        xb = x0 + 1
        ya = y0
        yb = y0 + 1
        za = z0
        zb = z0 + 1
        w00 = wx0 * wy0
        w01 = wx0 * wy1
        w10 = wx1 * wy0
        w11 = wx1 * wy1
        acc = _corner(vol_ptr, vol_base, xa, ya, za, w00 * wz0, inside & okx0 & oky0 & okz0, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xa, ya, zb, w00 * wz1, inside & okx0 & oky0 & okz1, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xa, yb, za, w01 * wz0, inside & okx0 & oky1 & okz0, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xa, yb, zb, w01 * wz1, inside & okx0 & oky1 & okz1, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xb, ya, za, w10 * wz0, inside & okx1 & oky0 & okz0, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xb, ya, zb, w10 * wz1, inside & okx1 & oky0 & okz1, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xb, yb, za, w11 * wz0, inside & okx1 & oky1 & okz0, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
        acc = _corner(vol_ptr, vol_base, xb, yb, zb, w11 * wz1, inside & okx1 & oky1 & okz1, NY, NZ, y, acc,
                      ADJOINT, INT64, DTYPE)
    if not ADJOINT:
        tl.store(proj_ptr + pix, acc * dt, mask=pmask)


def aot_specs():
    """Variants compiled ahead of time by ``python -m xwin.kernels.aot`` (see kernels/aot.py)."""
    return projector_aot_specs("trilinear", trilinear_kernel, ("dt_ptr",))
