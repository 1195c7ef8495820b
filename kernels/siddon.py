"""Triton kernel: exact Siddon projection (voxel walk) and its exact adjoint.

One program marches a BLOCK_R × BLOCK_C tile of detector pixels of one (volume b, view v) pair; the grid
covers all tiles × V views × B volumes in one launch. Each lane walks its ray through the voxels exactly
like ``reference.siddon_walk``: clip to the box [−½, N−½], entry voxel, then repeatedly step to the
nearest plane crossing. Forward accumulates ``segment × voxel`` in registers; the adjoint scatters
``segment × projection value`` into the volume with atomics. Nothing per ray is written to global memory.
"""

import triton
import triton.language as tl

from ._triton_common import projector_aot_specs, INF, clip_box, flat_offsets, reorigin, tile_rays, voxel_offset


@triton.jit
def siddon_kernel(vol_ptr, params_ptr, proj_ptr, V, ROWS, COLS, NX, NY, NZ,
                  IS_CONE: tl.constexpr, ADJOINT: tl.constexpr, DTYPE: tl.constexpr, INT64: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, rr, cc, pmask, ox, oy, oz, ex, ey, ez, tlo, thi, zero, fnx, fny, fnz = tile_rays(
        params_ptr, V, ROWS, COLS, NX, NY, NZ, IS_CONE, DTYPE, BLOCK_R, BLOCK_C)
    t0, t1 = clip_box(ox, oy, oz, ex, ey, ez, -0.5, fnx, fny, fnz, -0.5, tlo, thi, True)
    hit, L, t0, px, py, pz = reorigin(pmask, t0, t1, ox, oy, oz, ex, ey, ez)     # re-origin at the entry point
    sx = tl.where(ex > 0, 1.0, tl.where(ex < 0, -1.0, 0.0)).to(DTYPE)
    sy = tl.where(ey > 0, 1.0, tl.where(ey < 0, -1.0, 0.0)).to(DTYPE)
    sz = tl.where(ez > 0, 1.0, tl.where(ez < 0, -1.0, 0.0)).to(DTYPE)
    # entry voxel (direction-aware rounding at faces), clamped into the volume
    qx = px + 0.5
    qy = py + 0.5
    qz = pz + 0.5
    ix = tl.minimum(tl.maximum(tl.where(ex < 0, tl.ceil(qx) - 1, tl.floor(qx)), 0.0), fnx - 1)
    iy = tl.minimum(tl.maximum(tl.where(ey < 0, tl.ceil(qy) - 1, tl.floor(qy)), 0.0), fny - 1)
    iz = tl.minimum(tl.maximum(tl.where(ez < 0, tl.ceil(qz) - 1, tl.floor(qz)), 0.0), fnz - 1)
    # exit voxel, to bound the number of steps of this tile
    qx1 = px + L * ex + 0.5
    qy1 = py + L * ey + 0.5
    qz1 = pz + L * ez + 0.5
    jx = tl.minimum(tl.maximum(tl.where(ex > 0, tl.ceil(qx1) - 1, tl.floor(qx1)), 0.0), fnx - 1)
    jy = tl.minimum(tl.maximum(tl.where(ey > 0, tl.ceil(qy1) - 1, tl.floor(qy1)), 0.0), fny - 1)
    jz = tl.minimum(tl.maximum(tl.where(ez > 0, tl.ceil(qz1) - 1, tl.floor(qz1)), 0.0), fnz - 1)
    nsteps = (tl.abs(jx - ix) + tl.abs(jy - iy) + tl.abs(jz - iz)).to(tl.int32) + 3
    nsteps = tl.where(hit, nsteps, 0)
    nmax = tl.max(nsteps, axis=0)
    # axes with |e| ≤ 1e-30 are never crossed (as in the reference): 1/e would overflow float32 for
    # denormal components, and a crossing time (c − p)·inf is NaN for a ray starting on a face
    nzx = tl.abs(ex) > 1e-30
    nzy = tl.abs(ey) > 1e-30
    nzz = tl.abs(ez) > 1e-30
    vx = tl.where(nzx, 1.0 / tl.where(nzx, ex, 1.0), 0.0)
    vy = tl.where(nzy, 1.0 / tl.where(nzy, ey, 1.0), 0.0)
    vz = tl.where(nzz, 1.0 / tl.where(nzz, ez, 1.0), 0.0)
    bx = tl.where(nzx, 0.0, INF).to(DTYPE)
    by = tl.where(nzy, 0.0, INF).to(DTYPE)
    bz = tl.where(nzz, 0.0, INF).to(DTYPE)
    tnx = (ix + 0.5 * sx - px) * vx + bx
    tny = (iy + 0.5 * sy - py) * vy + by
    tnz = (iz + 0.5 * sz - pz) * vz + bz
    t = L * 0
    vol_base, pix = flat_offsets(b, v, V, rr, cc, ROWS, COLS, NX, NY, NZ, INT64)
    active = hit
    if ADJOINT:
        y = tl.load(proj_ptr + pix, mask=hit, other=0.0).to(DTYPE)
    else:
        acc = L * 0
    for _ in range(0, nmax):
        tmin = tl.minimum(tl.minimum(tnx, tny), tl.minimum(tnz, L))
        seg = tl.maximum(tmin - t, 0.0)
        ok = active & (ix >= 0) & (ix < fnx) & (iy >= 0) & (iy < fny) & (iz >= 0) & (iz < fnz)
        off = voxel_offset(vol_base, ix, iy, iz, NY, NZ, INT64)
        if ADJOINT:
            tl.atomic_add(vol_ptr + off, seg * y, mask=ok & (seg > 0))
        else:
            val = tl.load(vol_ptr + off, mask=ok, other=0.0).to(DTYPE)
            acc += seg * val
        mx = (tnx <= tny) & (tnx <= tnz)          # ties: lowest axis first, as in the reference
        my = (~mx) & (tny <= tnz)
        mz = ~(mx | my)
        ix = tl.where(mx, ix + sx, ix)
        iy = tl.where(my, iy + sy, iy)
        iz = tl.where(mz, iz + sz, iz)
        tnx = tl.where(mx, (ix + 0.5 * sx - px) * vx + bx, tnx)
        tny = tl.where(my, (iy + 0.5 * sy - py) * vy + by, tny)
        tnz = tl.where(mz, (iz + 0.5 * sz - pz) * vz + bz, tnz)
        t = tmin
        active = active & (t < L)
    if not ADJOINT:
        tl.store(proj_ptr + pix, acc, mask=pmask)


def aot_specs():
    """Variants compiled ahead of time by ``python -m xwin.kernels.aot`` (see kernels/aot.py)."""
    return projector_aot_specs("siddon", siddon_kernel, ())
