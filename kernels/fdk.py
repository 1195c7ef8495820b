"""Triton kernel: voxel-driven weighted backprojection (the FDK / FBP backprojection step).

Contract and torch reference: :mod:`xwin.kernels.fdk_backproject`. One program per tile of ``BLOCK``
consecutive voxels (flat index, z fastest) of one volume of the batch; it loops over all views, projects
its voxel centres through the view's (3, 4) matrix, gathers four taps per voxel and accumulates in
registers; every voxel is written exactly once (no atomics).
"""

import triton
import triton.language as tl

__all__ = ["fdk_backproject_kernel", "aot_specs", "BLOCK", "NUM_WARPS"]

BLOCK = 256
NUM_WARPS = 4


@triton.jit
def fdk_backproject_kernel(q_ptr, mat_ptr, out_ptr, V, ROWS, COLS, NX, NY, NZ,
                           DIST_WEIGHT: tl.constexpr, DTYPE: tl.constexpr, INT64: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    if INT64:
        flat = pid.to(tl.int64) * BLOCK + offs
        bb = b.to(tl.int64)
        # (sizes equal to 1 arrive as Python constexprs under the JIT's specialisation: no .to())
        nvox = (bb * 0 + NX) * NY * NZ
        plane = (bb * 0 + ROWS) * COLS
    else:
        flat = pid * BLOCK + offs
        nvox = NX * NY * NZ
        plane = ROWS * COLS
        bb = b
    vmask = flat < nvox
    kk = flat % NZ
    ij = flat // NZ
    jj = ij % NY
    ii = ij // NY
    fi = ii.to(DTYPE)
    fj = jj.to(DTYPE)
    fk = kk.to(DTYPE)
    fcols = tl.zeros([BLOCK], DTYPE) + COLS
    frows = tl.zeros([BLOCK], DTYPE) + ROWS
    acc = tl.zeros([BLOCK], dtype=DTYPE)
    qb = q_ptr + bb * V * plane
    for v in range(0, V):
        mp = mat_ptr + v * 12
        w = tl.load(mp + 8).to(DTYPE) * fi + tl.load(mp + 9).to(DTYPE) * fj \
            + tl.load(mp + 10).to(DTYPE) * fk + tl.load(mp + 11).to(DTYPE)
        cn = tl.load(mp + 0).to(DTYPE) * fi + tl.load(mp + 1).to(DTYPE) * fj \
            + tl.load(mp + 2).to(DTYPE) * fk + tl.load(mp + 3).to(DTYPE)
        rn = tl.load(mp + 4).to(DTYPE) * fi + tl.load(mp + 5).to(DTYPE) * fj \
            + tl.load(mp + 6).to(DTYPE) * fk + tl.load(mp + 7).to(DTYPE)
        ok = w > 0
        winv = tl.where(ok, 1.0 / tl.where(ok, w, 1.0), 0.0)
        c = tl.minimum(tl.maximum(cn * winv, -2.0), fcols + 1.0)
        r = tl.minimum(tl.maximum(rn * winv, -2.0), frows + 1.0)
        c0 = tl.floor(c)
        r0 = tl.floor(r)
        fc = c - c0
        fr = r - r0
        ic = c0.to(tl.int32)
        ir = r0.to(tl.int32)
        okc0 = (ic >= 0) & (ic < COLS)
        okc1 = (ic + 1 >= 0) & (ic + 1 < COLS)
        okr0 = vmask & (ir >= 0) & (ir < ROWS)
        okr1 = vmask & (ir + 1 >= 0) & (ir + 1 < ROWS)
        if INT64:
            base = qb + v * plane + ir.to(tl.int64) * COLS + ic      # plane is int64 here
        else:
            base = qb + v * plane + ir * COLS + ic
        q00 = tl.load(base, mask=okr0 & okc0, other=0.0).to(DTYPE)
        q01 = tl.load(base + 1, mask=okr0 & okc1, other=0.0).to(DTYPE)
        q10 = tl.load(base + COLS, mask=okr1 & okc0, other=0.0).to(DTYPE)
        q11 = tl.load(base + COLS + 1, mask=okr1 & okc1, other=0.0).to(DTYPE)
        val = (1.0 - fr) * ((1.0 - fc) * q00 + fc * q01) + fr * ((1.0 - fc) * q10 + fc * q11)
        if DIST_WEIGHT:
            acc += val * (winv * winv)
        else:
            acc += tl.where(ok, val, 0.0)
    tl.store(out_ptr + bb * nvox + flat, acc, mask=vmask)


def aot_specs():
    """Variants compiled ahead of time by ``python -m xwin.kernels.aot`` (see kernels/aot.py)."""
    specs = []
    for (pt, dt) in (("*fp32", tl.float32), ("*fp64", tl.float64)):
        for dw in (True, False):
            for i64 in (False, True):
                specs.append(dict(
                    name=f"fdk_backproject dist_weight={dw} dtype={pt[1:]} int64={i64}",
                    fn=fdk_backproject_kernel,
                    signature={"q_ptr": pt, "mat_ptr": pt, "out_ptr": pt, "V": "i32", "ROWS": "i32",
                               "COLS": "i32", "NX": "i32", "NY": "i32", "NZ": "i32"},
                    constexprs=dict(DIST_WEIGHT=dw, DTYPE=dt, INT64=i64, BLOCK=BLOCK),
                    num_warps=NUM_WARPS))
    return specs
