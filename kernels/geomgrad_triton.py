"""Triton kernels: the per-ray derivatives of ``project`` with respect to the ray (origin, direction, end).

The Triton counterpart of the torch reference pass in :mod:`xwin.kernels.geomgrad` (which documents the
mathematics). One program takes a BLOCK_R × BLOCK_C tile of detector pixels of one (volume b, view v) pair
and walks its rays exactly like the forward kernels (``siddon.py``, ``trilinear.py``), accumulating in
registers, weighted by the incoming gradient ``w`` of each ray, the numbers the reference accumulates before
mapping them onto the ray record:

* Siddon: ``g_o`` (3), ``g_e`` (3) from the voxel-face crossings (``(f_before − f_after)·∂t_c``), the entry
  into and the exit from the volume, and ``g_L`` (the end of a cone-beam ray lying inside the volume);
* trilinear: ``g_o``, ``g_e`` from the samples' interpolant gradients and the entry point, and ``g_dt``
  (the derivative with respect to the step); ``g_L = 0``.

Each ray writes its eight numbers ``[g_o, g_e, g_L, g_dt]`` (zeros for rays that miss); nothing is stored
per crossing or per sample. The arithmetic follows the reference operation for operation (same clipping,
same walk and tie rule, same sample positions), so float64 results agree with it to rounding and float32 ones
to float32 rounding (tests/test_geomgrad_triton.py). Mapping the per-ray numbers onto the 24-number records stays in torch
(``geomgrad._records_from_rays``).
"""

import itertools

import torch
import triton
import triton.language as tl

from ._triton_common import INF, axis_range, flat_offsets, reorigin, tile_rays, voxel_offset

__all__ = ["siddon_grad_kernel", "trilinear_grad_kernel", "ray_grads", "NOUT", "aot_specs"]

#: numbers written per ray: g_o (3), g_e (3), g_L, g_dt
NOUT = 8
_NOUT = tl.constexpr(NOUT)
_INT32_MAX = 2**31 - 1


@triton.jit
def _box_terms(ox, oy, oz, ex, ey, ez, lo, fnx, fny, fnz, hi_off, tlo, thi, UPPER_OPEN: tl.constexpr):
    """Clip to the box [lo, N + hi_off] like ``clip_box``, and say which constraint is active at each end (as
    ``geomgrad._axis_terms``): t0, t1, the entry axis (0/1/2, or −1 when the range start ``tlo`` is active),
    the exit axis (−1 when the range end ``thi`` is active). Ties go to the lowest axis (torch's max/min)."""
    ax0, ax1 = axis_range(ox, ex, lo, fnx + hi_off, UPPER_OPEN)
    ay0, ay1 = axis_range(oy, ey, lo, fny + hi_off, UPPER_OPEN)
    az0, az1 = axis_range(oz, ez, lo, fnz + hi_off, UPPER_OPEN)
    emax = tl.maximum(ax0, tl.maximum(ay0, az0))
    xmin = tl.minimum(ax1, tl.minimum(ay1, az1))
    ent = tl.where((ax0 >= ay0) & (ax0 >= az0), 0, tl.where(ay0 >= az0, 1, 2))
    ext = tl.where((ax1 <= ay1) & (ax1 <= az1), 0, tl.where(ay1 <= az1, 1, 2))
    ent = tl.where(emax > tlo, ent, -1)
    ext = tl.where(xmin < thi, ext, -1)
    return tl.maximum(tlo, emax), tl.minimum(thi, xmin), ent, ext


@triton.jit
def _inv_on(axis, a, e):
    """``1/e`` where ``axis == a``, else 0 (the end terms' ∂t/∂o = −1/e on the active axis only)."""
    return tl.where(axis == a, 1.0 / tl.where(e != 0, e, 1.0), 0.0)


@triton.jit
def _store_ray(out_ptr, pix, pmask, hit, w, gox, goy, goz, gex, gey, gez, gl, gdt, INT64: tl.constexpr):
    """Write the eight per-ray numbers × ``w`` (zeros for rays that miss: their t0/t1 may be infinite)."""
    if INT64:
        base = out_ptr + pix.to(tl.int64) * _NOUT
    else:
        base = out_ptr + pix * _NOUT
    tl.store(base + 0, tl.where(hit, gox * w, 0.0), mask=pmask)
    tl.store(base + 1, tl.where(hit, goy * w, 0.0), mask=pmask)
    tl.store(base + 2, tl.where(hit, goz * w, 0.0), mask=pmask)
    tl.store(base + 3, tl.where(hit, gex * w, 0.0), mask=pmask)
    tl.store(base + 4, tl.where(hit, gey * w, 0.0), mask=pmask)
    tl.store(base + 5, tl.where(hit, gez * w, 0.0), mask=pmask)
    tl.store(base + 6, tl.where(hit, gl * w, 0.0), mask=pmask)
    tl.store(base + 7, tl.where(hit, gdt * w, 0.0), mask=pmask)


@triton.jit
def _entry_index(p, e, fn):
    """Entry voxel on one axis (direction-aware rounding at faces), clamped into the volume; as siddon.py."""
    q = p + 0.5
    return tl.minimum(tl.maximum(tl.where(e < 0, tl.ceil(q) - 1, tl.floor(q)), 0.0), fn - 1)


@triton.jit
def _exit_index(p, e, fn):
    q = p + 0.5
    return tl.minimum(tl.maximum(tl.where(e > 0, tl.ceil(q) - 1, tl.floor(q)), 0.0), fn - 1)


@triton.jit
def _axis_walk_setup(p, e, i, DTYPE: tl.constexpr):
    """Step sign, 1/e (0 for |e| ≤ 1e-30: never crossed), the never-crossed offset (inf) and the first crossing."""
    s = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)).to(DTYPE)
    nz = tl.abs(e) > 1e-30
    inv = tl.where(nz, 1.0 / tl.where(nz, e, 1.0), 0.0)
    big = tl.where(nz, 0.0, INF).to(DTYPE)
    return s, inv, big, (i + 0.5 * s - p) * inv + big


@triton.jit
def siddon_grad_kernel(vol_ptr, params_ptr, grad_ptr, out_ptr, V, ROWS, COLS, NX, NY, NZ,
                       IS_CONE: tl.constexpr, DTYPE: tl.constexpr, INT64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, rr, cc, pmask, ox, oy, oz, ex, ey, ez, tlo, thi, zero, fnx, fny, fnz = tile_rays(
        params_ptr, V, ROWS, COLS, NX, NY, NZ, IS_CONE, DTYPE, BLOCK_R, BLOCK_C)
    t0, t1, ent, ext = _box_terms(ox, oy, oz, ex, ey, ez, -0.5, fnx, fny, fnz, -0.5, tlo, thi, True)
    hit, L, t0, px, py, pz = reorigin(pmask, t0, t1, ox, oy, oz, ex, ey, ez)
    at_thi = hit & (ext < 0)                      # a cone ray ending inside the volume
    t1 = tl.where(hit, t1, 0.0)
    ix = _entry_index(px, ex, fnx)
    iy = _entry_index(py, ey, fny)
    iz = _entry_index(pz, ez, fnz)
    jx = _exit_index(px + L * ex, ex, fnx)
    jy = _exit_index(py + L * ey, ey, fny)
    jz = _exit_index(pz + L * ez, ez, fnz)
    nsteps = tl.where(hit, (tl.abs(jx - ix) + tl.abs(jy - iy) + tl.abs(jz - iz)).to(tl.int32) + 3, 0)
    nmax = tl.max(nsteps, axis=0)
    sx, vx, bx, tnx = _axis_walk_setup(px, ex, ix, DTYPE)
    sy, vy, by, tny = _axis_walk_setup(py, ey, iy, DTYPE)
    sz, vz, bz, tnz = _axis_walk_setup(pz, ez, iz, DTYPE)
    vol_base, pix = flat_offsets(b, v, V, rr, cc, ROWS, COLS, NX, NY, NZ, INT64)
    w = tl.load(grad_ptr + pix, mask=pmask, other=0.0).to(DTYPE)
    t = zero
    active = hit
    # the previous step: its voxel value, in-volume flag, whether its end was an interior crossing, the
    # crossing time and the axis crossed there (0/1/2)
    pv = zero
    pok = zero
    pcross = zero
    ptc = zero
    pax = tl.zeros([BLOCK_R * BLOCK_C], tl.int32)
    gox = zero
    goy = zero
    goz = zero
    gex = zero
    gey = zero
    gez = zero
    first = zero
    last = zero
    for k in range(0, nmax):
        tmin3 = tl.minimum(tl.minimum(tnx, tny), tnz)
        tmin = tl.minimum(tmin3, L)
        inb = (ix >= 0) & (ix < fnx) & (iy >= 0) & (iy < fny) & (iz >= 0) & (iz < fnz)
        okf = tl.where(inb, 1.0, 0.0).to(DTYPE)
        off = voxel_offset(vol_base, ix, iy, iz, NY, NZ, INT64)
        val = tl.load(vol_ptr + off, mask=active & inb, other=0.0).to(DTYPE)
        first = tl.where(k == 0, val, first)
        # the crossing that ended the previous step, when both voxels are inside: (f_before − f_after)·∂t_c
        jump = (pv - val) * pcross * pok * okf
        tabs = ptc + t0
        gx = jump * tl.where(pax == 0, vx, 0.0)
        gy = jump * tl.where(pax == 1, vy, 0.0)
        gz = jump * tl.where(pax == 2, vz, 0.0)
        gox -= gx
        goy -= gy
        goz -= gz
        gex -= gx * tabs
        gey -= gy * tabs
        gez -= gz * tabs
        last = tl.where(active & inb, val, last)
        pv = val
        pok = okf
        pcross = tl.where(active & (tmin3 < L), 1.0, 0.0).to(DTYPE)
        ptc = tmin3
        mx = (tnx <= tny) & (tnx <= tnz)          # ties: lowest axis first, as in the forward walk
        my = (~mx) & (tny <= tnz)
        mz = ~(mx | my)
        pax = tl.where(mx, 0, tl.where(my, 1, 2))
        ix = tl.where(mx, ix + sx, ix)
        iy = tl.where(my, iy + sy, iy)
        iz = tl.where(mz, iz + sz, iz)
        tnx = tl.where(mx, (ix + 0.5 * sx - px) * vx + bx, tnx)
        tny = tl.where(my, (iy + 0.5 * sy - py) * vy + by, tny)
        tnz = tl.where(mz, (iz + 0.5 * sz - pz) * vz + bz, tnz)
        t = tmin
        active = active & (t < L)
    # entry: −f_first·∂t0 (∂t0/∂o_a = −1/e_a on the entry axis); exit: +f_last·∂t1
    axo = first * _inv_on(ent, 0, ex)
    ayo = first * _inv_on(ent, 1, ey)
    azo = first * _inv_on(ent, 2, ez)
    gox += axo
    goy += ayo
    goz += azo
    gex += axo * t0
    gey += ayo * t0
    gez += azo * t0
    bxo = -(last * _inv_on(ext, 0, ex))
    byo = -(last * _inv_on(ext, 1, ey))
    bzo = -(last * _inv_on(ext, 2, ez))
    gox += bxo
    goy += byo
    goz += bzo
    gex += bxo * t1
    gey += byo * t1
    gez += bzo * t1
    gl = tl.where(at_thi, last, 0.0)
    _store_ray(out_ptr, pix, pmask, hit, w, gox, goy, goz, gex, gey, gez, gl, zero, INT64)


@triton.jit
def _corner_value(vol_ptr, vol_base, ix, iy, iz, ok, NY, NZ, INT64: tl.constexpr, DTYPE: tl.constexpr):
    off = voxel_offset(vol_base, ix, iy, iz, NY, NZ, INT64)
    return tl.load(vol_ptr + off, mask=ok, other=0.0).to(DTYPE)


@triton.jit
def trilinear_grad_kernel(vol_ptr, params_ptr, grad_ptr, out_ptr, dt_ptr, V, ROWS, COLS, NX, NY, NZ,
                          IS_CONE: tl.constexpr, DTYPE: tl.constexpr, INT64: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, rr, cc, pmask, ox, oy, oz, ex, ey, ez, tlo, thi, zero, fnx, fny, fnz = tile_rays(
        params_ptr, V, ROWS, COLS, NX, NY, NZ, IS_CONE, DTYPE, BLOCK_R, BLOCK_C)
    dt = tl.load(dt_ptr + b).to(DTYPE)
    t0, t1, ent, _ = _box_terms(ox, oy, oz, ex, ey, ez, -1.0, fnx, fny, fnz, 0.0, tlo, thi, False)
    hit, L, t0, px, py, pz = reorigin(pmask, t0, t1, ox, oy, oz, ex, ey, ez)
    nsamp = tl.where(hit, tl.ceil(L / dt).to(tl.int32) + 1, 0)
    kmax = tl.max(nsamp, axis=0)
    vol_base, pix = flat_offsets(b, v, V, rr, cc, ROWS, COLS, NX, NY, NZ, INT64)
    w = tl.load(grad_ptr + pix, mask=pmask, other=0.0).to(DTYPE)
    # Σ ∇f over the samples (G), Σ ∇f·(t0 + t) (H), Σ f (F); G and H are multiplied by dt at the end
    gx = zero
    gy = zero
    gz = zero
    hx = zero
    hy = zero
    hz = zero
    fsum = zero
    for k in range(0, kmax):
        t = (k + 0.5) * dt
        inside = hit & (t < L)
        qx = px + t * ex
        qy = py + t * ey
        qz = pz + t * ez
        x0 = tl.floor(qx)
        y0 = tl.floor(qy)
        z0 = tl.floor(qz)
        wx1 = qx - x0
        wy1 = qy - y0
        wz1 = qz - z0
        wx0 = 1 - wx1
        wy0 = 1 - wy1
        wz0 = 1 - wz1
        # corners outside the volume read 0 (the interpolant's zero padding)
        okx0 = inside & (x0 >= 0) & (x0 <= fnx - 1)
        okx1 = inside & (x0 >= -1) & (x0 <= fnx - 2)
        oky0 = (y0 >= 0) & (y0 <= fny - 1)
        oky1 = (y0 >= -1) & (y0 <= fny - 2)
        okz0 = (z0 >= 0) & (z0 <= fnz - 1)
        okz1 = (z0 >= -1) & (z0 <= fnz - 2)
        v000 = _corner_value(vol_ptr, vol_base, x0, y0, z0, okx0 & oky0 & okz0, NY, NZ, INT64, DTYPE)
        v001 = _corner_value(vol_ptr, vol_base, x0, y0, z0 + 1, okx0 & oky0 & okz1, NY, NZ, INT64, DTYPE)
        v010 = _corner_value(vol_ptr, vol_base, x0, y0 + 1, z0, okx0 & oky1 & okz0, NY, NZ, INT64, DTYPE)
        v011 = _corner_value(vol_ptr, vol_base, x0, y0 + 1, z0 + 1, okx0 & oky1 & okz1, NY, NZ, INT64, DTYPE)
        v100 = _corner_value(vol_ptr, vol_base, x0 + 1, y0, z0, okx1 & oky0 & okz0, NY, NZ, INT64, DTYPE)
        v101 = _corner_value(vol_ptr, vol_base, x0 + 1, y0, z0 + 1, okx1 & oky0 & okz1, NY, NZ, INT64, DTYPE)
        v110 = _corner_value(vol_ptr, vol_base, x0 + 1, y0 + 1, z0, okx1 & oky1 & okz0, NY, NZ, INT64, DTYPE)
        v111 = _corner_value(vol_ptr, vol_base, x0 + 1, y0 + 1, z0 + 1, okx1 & oky1 & okz1, NY, NZ, INT64, DTYPE)
        # the interpolant and its gradient, summed in the reference's order (corner (a, b, c) at 4a + 2b + c)
        fval = (v000 * wx0 * wy0 * wz0 + v001 * wx0 * wy0 * wz1 + v010 * wx0 * wy1 * wz0 + v011 * wx0 * wy1 * wz1
                + v100 * wx1 * wy0 * wz0 + v101 * wx1 * wy0 * wz1 + v110 * wx1 * wy1 * wz0 + v111 * wx1 * wy1 * wz1)
        dfx = ((v100 - v000) * wy0 * wz0 + (v101 - v001) * wy0 * wz1 + (v110 - v010) * wy1 * wz0
               + (v111 - v011) * wy1 * wz1)
        dfy = ((v010 - v000) * wx0 * wz0 + (v011 - v001) * wx0 * wz1 + (v110 - v100) * wx1 * wz0
               + (v111 - v101) * wx1 * wz1)
        dfz = ((v001 - v000) * wx0 * wy0 + (v011 - v010) * wx0 * wy1 + (v101 - v100) * wx1 * wy0
               + (v111 - v110) * wx1 * wy1)
        dfx = tl.where(inside, dfx, 0.0)
        dfy = tl.where(inside, dfy, 0.0)
        dfz = tl.where(inside, dfz, 0.0)
        ta = t0 + t
        gx += dfx
        gy += dfy
        gz += dfz
        hx += dfx * ta
        hy += dfy * ta
        hz += dfz * ta
        fsum += tl.where(inside, fval, 0.0)
    gx = gx * dt
    gy = gy * dt
    gz = gz * dt
    hx = hx * dt
    hy = hy * dt
    hz = hz * dt
    # the entry point moves with the ray: ∂t0/∂o_a = −1/e_a, ∂t0/∂e_a = −t0/e_a on the entry axis
    ge_dot = gx * ex + gy * ey + gz * ez
    ivx = _inv_on(ent, 0, ex)
    ivy = _inv_on(ent, 1, ey)
    ivz = _inv_on(ent, 2, ez)
    gdt = fsum + ((hx - t0 * gx) * ex + (hy - t0 * gy) * ey + (hz - t0 * gz) * ez) / dt
    _store_ray(out_ptr, pix, pmask, hit, w, gx - ge_dot * ivx, gy - ge_dot * ivy, gz - ge_dot * ivz,
               hx - ge_dot * t0 * ivx, hy - ge_dot * t0 * ivy, hz - ge_dot * t0 * ivz, zero, gdt, INT64)


# ------------------------------------------------------------------------------------------ launcher

def ray_grads(volume, grad, params, dt_mm, kind: str, method: str, out=None):
    """Per-ray weighted derivatives, (B, V·rows·cols, 8) in the compute dtype on the volume's device.

    ``volume`` (B, X, Y, Z), ``grad`` (B, V, rows, cols) (the weights), ``params`` (B, V, 24) ray records,
    ``dt_mm`` (B,) trilinear steps. ``out`` (optional, that shape and dtype) is filled in place; every
    element is written (tests pass a poisoned one)."""
    from ._triton import BLOCK_C, BLOCK_R, NUM_WARPS, _dtype

    B, X, Y, Z = volume.shape
    _, V, rows, cols = grad.shape
    cdt, tdt = _dtype(volume.dtype)
    dev = volume.device
    prm = params.detach().to(device=dev, dtype=cdt).contiguous()
    g = grad.detach().to(device=dev, dtype=cdt).contiguous()
    if out is None:
        out = torch.empty(B, V * rows * cols, NOUT, device=dev, dtype=cdt)
    if V > 65535 or B > 65535:
        raise ValueError(f"at most 65535 views and 65535 volumes per launch, got V={V}, B={B}")
    int64 = max(B * X * Y * Z, B * V * rows * cols * NOUT) > _INT32_MAX - 1
    grid = (triton.cdiv(rows, BLOCK_R) * triton.cdiv(cols, BLOCK_C), V, B)
    common = dict(IS_CONE=kind == "cone", DTYPE=tdt, INT64=int64, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                  num_warps=NUM_WARPS)
    vol = volume.detach().contiguous()
    if method == "siddon":
        siddon_grad_kernel[grid](vol, prm, g, out, V, rows, cols, X, Y, Z, **common)
    else:
        dts = dt_mm.detach().to(device=dev, dtype=cdt).contiguous()
        trilinear_grad_kernel[grid](vol, prm, g, out, dts, V, rows, cols, X, Y, Z, **common)
    return out


def aot_specs():
    """Variants compiled ahead of time by ``python -m xwin.kernels.aot`` (see kernels/aot.py): both methods ×
    cone/parallel × storage dtype, and the int64-offset variant of the float32 and float64 ones (the offset
    width does not interact with the storage type; fewer variants keep the CI's compile check short)."""
    ints = {k: "i32" for k in ("V", "ROWS", "COLS", "NX", "NY", "NZ")}
    storage = [(vt, dt, i64) for vt, dt in (("*fp32", tl.float32), ("*fp64", tl.float64)) for i64 in (False, True)]
    storage += [("*fp16", tl.float32, False), ("*bf16", tl.float32, False)]
    specs = []
    for (name, fn, extra), cone, (vt, dt, i64) in itertools.product(
            (("siddon_grad", siddon_grad_kernel, ()), ("trilinear_grad", trilinear_grad_kernel, ("dt_ptr",))),
            (True, False), storage):
        ct = "*fp64" if dt == tl.float64 else "*fp32"
        sig = {"vol_ptr": vt, "params_ptr": ct, "grad_ptr": ct, "out_ptr": ct, **{p: ct for p in extra}, **ints}
        specs.append(dict(name=f"{name} cone={cone} vol={vt} int64={i64}", fn=fn, signature=sig,
                          constexprs=dict(IS_CONE=cone, DTYPE=dt, INT64=i64, BLOCK_R=8, BLOCK_C=16)))
    return specs
