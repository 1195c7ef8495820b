"""Gradients of ``project`` with respect to the ray records (hence the geometry and the affine): a dedicated
per-ray analytic backward pass, in two implementations of the same arithmetic — the torch reference here (the
CPU path, any device) and the Triton kernels of :mod:`xwin.kernels.geomgrad_triton` (one program per tile of
rays walks them like the forward kernels and writes each ray's weighted ``g_o, g_e, g_L, g_dt``; float64
results equal the reference's to rounding: ≤ 2e-16 relative measured under the interpreter, 1e-10 tested).
``xwin::project_geometry_grad`` takes a ``backend`` argument (default ``"auto"``: the kernels for CUDA
tensors, the reference otherwise; ``"triton"`` also runs the kernels under ``TRITON_INTERPRET=1``). Either
way the per-ray numbers are mapped onto the records in torch (:func:`_records_from_rays` / :func:`_to_record`).

For one ray with origin ``o`` and direction ``e`` (per mm) in index space, the pass accumulates, weighted
by the incoming gradient ``w`` of that ray, the derivatives ``g_o = w ∂p/∂o``, ``g_e = w ∂p/∂e`` and, for
cone beam, ``g_L = w ∂p/∂L`` (``L`` = the world length source→pixel, the end of the ray); it stores
nothing per voxel crossing. They are then mapped onto the 24-number record (:mod:`xwin.kernels.layout`):

* parallel beam: ``o = P = C + c·U + r·V`` and ``e = E``;
* cone beam: ``o = S``, ``d = P − S``, ``L = |M d|``, ``e = d / L``, so
  ``g_d = g_e / L − (Mᵀ M d)(d·g_e) / L³ + g_L Mᵀ M d / L``, ``g_M = (g_L / L − (d·g_e) / L³)(M d) dᵀ``,
  ``g_S = g_o − g_d``, ``g_P = g_d``.

**Siddon** (``p = Σ_j f_j · (t_{j+1} − t_j)``, ``f`` piecewise constant): the exact derivative wherever it
exists. Moving the ray moves its voxel-face crossings ``t_c = (c − o_a)/e_a`` (``∂t_c/∂o_a = −1/e_a``,
``∂t_c/∂e_a = −t_c/e_a``), and each crossing contributes ``(f_before − f_after)·∂t_c``. The entry into
and exit from the volume are crossings with the outside value 0; a cone-beam ray ending inside the volume
contributes ``f_last`` to ``∂p/∂L``; a source inside the volume (``t = 0``) does not move; a ray that misses
the volume contributes nothing (its entry and exit times may be infinite: they are not used). The derivative
does not exist on a measure-zero set of geometries: a ray running exactly in a voxel face, or passing
exactly through a voxel edge or corner (two or three crossings at one ``t``), or entering through an edge
of the volume. There the pass returns the one-sided derivative of the walk's own ordering (ties go to the
lowest axis first, as in the forward walk), which is one of the limits of the derivative from nearby
geometries; finite differences across such a set see a kink.

**Trilinear** (``p = dt · Σ_k f(o + t_k e)`` with ``t_k = t0 + (k + ½)·dt``, ``t0`` the entry into the
support of the zero-padded interpolant): the derivative of the sampled sum itself, through the samples'
positions, the entry point ``t0`` and the step ``dt`` (which depends on the affine's smallest spacing);
``∇f`` is the gradient of the interpolant (it jumps where a sample crosses a voxel-centre plane, a
measure-zero set). The number of samples is piecewise constant in the geometry and contributes nothing.
"""

from __future__ import annotations

import torch

from . import reference as R
from .layout import RAY_CENTER, RAY_FIRST, RAY_M, RAY_RECORD, RAY_U, RAY_V

__all__ = ["params_grad", "params_grad_reference", "params_grad_triton", "geometry_grad_op", "fused_siddon_op"]

_GRAD_CHUNK = 1 << 16
#: rays per block when mapping per-ray numbers onto records on a GPU (few large operations)
_GRAD_CHUNK_DEVICE = 1 << 20


def _axis_terms(o, e, lo, hi, tlo, thi, upper_open):
    """Entry/exit times and which constraint is active: (t0, t1, entry one-hot (R, 3), exit one-hot (R, 3),
    exit-at-thi flag (R,)). A one-hot row is all zero where the range bound (tlo / thi) is the active one."""
    nz = e != 0
    safe = torch.where(nz, e, torch.ones_like(e))
    ta = (lo - o) / safe
    tb = (hi - o) / safe
    inside = (o >= lo) & (o < hi) if upper_open else (o > lo) & (o < hi)
    big = torch.full_like(o, float("inf"))
    tmin = torch.where(nz, torch.minimum(ta, tb), torch.where(inside, -big, big))
    tmax = torch.where(nz, torch.maximum(ta, tb), torch.where(inside, big, -big))
    emax, eax = tmin.max(dim=1)
    xmin, xax = tmax.min(dim=1)
    t0 = torch.maximum(tlo, emax)
    t1 = torch.minimum(thi, xmin)
    onehot = lambda ax: torch.nn.functional.one_hot(ax, 3).to(o.dtype)
    ent = onehot(eax) * (emax > tlo).to(o.dtype)[:, None]
    ext = onehot(xax) * (xmin < thi).to(o.dtype)[:, None]
    return t0, t1, ent, ext, (xmin >= thi).to(o.dtype)


def _where_hit(hit, t):
    """``t`` where the ray meets the box, else 0."""
    return torch.where(hit, t, torch.zeros_like(t))


def _end_terms(f_end, onehot, t_end, e, sign):
    """``sign · f_end · ∂t_end`` for a box face on the axis in ``onehot``: (g_o, g_e) contributions."""
    inv = torch.where(onehot > 0, 1.0 / torch.where(e != 0, e, torch.ones_like(e)), torch.zeros_like(e))
    go = -sign * f_end[:, None] * inv
    return go, go * t_end[:, None]


def _siddon_ray_grads(flatvol, rb, w, shape):
    """(g_o, g_e, g_L, p) per ray of the block for the Siddon integral: the derivatives weighted by ``w``,
    and the integral ``p`` itself (unweighted, summed in the forward walk's order: bit-identical to it)."""
    o, e, tlo, thi = rb.o, rb.e, rb.tlo, rb.thi
    n = o.shape[0]
    N = torch.tensor(shape, device=o.device, dtype=o.dtype)
    t0, t1, ent, ext, at_thi = _axis_terms(o, e, -0.5, N - 0.5, tlo, thi, True)
    first = torch.zeros_like(tlo)
    last = torch.zeros_like(tlo)
    # per live ray state, written back to the block arrays when the walk drops finished rays
    st = {k: torch.zeros(n, device=o.device, dtype=o.dtype) for k in ("pv", "pok", "pcross", "ptc", "px", "py", "pz")}
    acc = {k: torch.zeros(n, device=o.device, dtype=o.dtype) for k in ("gox", "goy", "goz", "gex", "gey", "gez", "p")}
    inv_all = torch.where(e.abs() > 1e-30, 1.0 / torch.where(e != 0, e, torch.ones_like(e)), torch.zeros_like(e))
    last_ids, live, started = None, None, False
    for ids, flat, ok, t, tc, L, mx, my, mz, seg in R.siddon_walk(o, e, tlo, thi, shape, detail=True):
        if ids is not last_ids:
            if last_ids is not None:
                for k in st:
                    st[k][last_ids] = live[k]
                for k in acc:
                    acc[k][last_ids] = live[k]
                last[last_ids] = live["last"]
            last_ids = ids
            live = {k: st[k][ids] for k in st}
            live.update({k: acc[k][ids] for k in acc})
            live["last"] = last[ids]
            live["t0"] = t0[ids]
            live["inv"] = [inv_all[ids, a] for a in range(3)]
        raw = flatvol.take(flat)
        live["p"].add_(seg * raw)
        val = raw * ok
        if not started:
            first[ids] = val
            started = True
        active = (t < L).to(val.dtype)
        # the crossing that ended the previous step is interior when both voxels are inside the volume
        jump = (live["pv"] - val) * live["pcross"] * live["pok"] * ok
        tabs = live["ptc"] + live["t0"]
        for a, (m, key) in enumerate(((live["px"], "x"), (live["py"], "y"), (live["pz"], "z"))):
            gx = jump * m * live["inv"][a]
            live["go" + key].sub_(gx)
            live["ge" + key].sub_(gx * tabs)
        live["last"] = torch.where((active * ok) > 0, val, live["last"])
        live["pv"], live["pok"] = val, ok.clone()
        live["pcross"] = active * (tc < L).to(val.dtype)
        live["ptc"] = tc
        live["px"], live["py"], live["pz"] = mx.clone(), my.clone(), mz.clone()
    if last_ids is not None:
        for k in acc:
            acc[k][last_ids] = live[k]
        last[last_ids] = live["last"]
    hitb = t1 > t0
    hit = hitb.to(o.dtype)
    go = torch.stack([acc["gox"], acc["goy"], acc["goz"]], 1)
    ge = torch.stack([acc["gex"], acc["gey"], acc["gez"]], 1)
    # (a ray that misses may have an infinite t0 / t1: 0·inf would make its zero terms NaN)
    a_o, a_e = _end_terms(first * hit, ent, _where_hit(hitb, t0), e, -1.0)   # entry: −f_first · ∂t0
    b_o, b_e = _end_terms(last * hit, ext, _where_hit(hitb, t1), e, 1.0)     # exit: +f_last · ∂t1
    go = (go + a_o + b_o) * w[:, None]
    ge = (ge + a_e + b_e) * w[:, None]
    gL = last * hit * at_thi * w
    return go, ge, gL, acc["p"]


def _trilinear_ray_grads(padvol, rb, w, shape, dt):
    """(g_o, g_e, g_L = 0, g_dt) per ray of the block for the sampled trilinear integral, weighted by ``w``."""
    o, e, tlo, thi = rb.o, rb.e, rb.tlo, rb.thi
    dev, cdt = o.device, o.dtype
    N = torch.tensor(shape, device=dev, dtype=cdt)
    t0, t1, ent, _, _ = _axis_terms(o, e, -1.0, N, tlo, thi, False)
    n = o.shape[0]
    G = torch.zeros(n, 3, device=dev, dtype=cdt)
    H = torch.zeros(n, 3, device=dev, dtype=cdt)
    F = torch.zeros(n, device=dev, dtype=cdt)
    hit = t1 > t0
    ids = torch.nonzero(hit).flatten()
    if ids.numel():
        oi, ei, t0i = o[ids], e[ids], t0[ids]
        L = t1[ids] - t0i
        p = oi + t0i[:, None] * ei
        Gi, Hi, Fi = G[ids], H[ids], F[ids]
        for t, inside, ws, flat, offsets in R.sample_blocks(p, ei, L, shape, dt):
            v = [padvol[off:].take(flat) for off in offsets]              # corner (a, b, c) at 4a + 2b + c
            wx, wy, wz = ws
            fval = sum(v[4 * a + 2 * b + c] * wx[a] * wy[b] * wz[c] for a in (0, 1) for b in (0, 1) for c in (0, 1))
            dfx = sum((v[4 + 2 * b + c] - v[2 * b + c]) * wy[b] * wz[c] for b in (0, 1) for c in (0, 1))
            dfy = sum((v[4 * a + 2 + c] - v[4 * a + c]) * wx[a] * wz[c] for a in (0, 1) for c in (0, 1))
            dfz = sum((v[4 * a + 2 * b + 1] - v[4 * a + 2 * b]) * wx[a] * wy[b] for a in (0, 1) for b in (0, 1))
            grad = torch.stack([dfx, dfy, dfz], -1) * inside[..., None]       # (R, K, 3)
            Gi += grad.sum(1) * dt
            Hi += (grad * (t0i[:, None] + t)[..., None]).sum(1) * dt
            Fi += (fval * inside).sum(1)
        G[ids], H[ids], F[ids] = Gi, Hi, Fi
    ge_dot = (G * e).sum(1)
    t0 = _where_hit(hit, t0)                                          # (misses: t0 may be infinite)
    inv = torch.where(ent > 0, 1.0 / torch.where(e != 0, e, torch.ones_like(e)), torch.zeros_like(e))
    go = G - ge_dot[:, None] * inv                                   # ∂t0/∂o_a = −1/e_a on the entry axis
    ge = H - (ge_dot * t0)[:, None] * inv                            # ∂t0/∂e_a = −t0/e_a
    # ∂p/∂dt = Σ f_k + Σ ∇f_k·e (k + ½) = p/dt + ((H − t0 G)·e)/dt
    gdt = F + ((H - t0[:, None] * G) * e).sum(1) / dt
    gdt = torch.where(hit, gdt, torch.zeros_like(gdt))
    return go * w[:, None], ge * w[:, None], torch.zeros_like(t0), gdt * w


def _to_record(rb, kind, go, ge, gL, V):
    """Sum the per-ray (g_o, g_e, g_L) of a block into (V, 24) record gradients."""
    n = go.shape[0]
    out = go.new_zeros(V, RAY_RECORD)
    if kind == "cone":
        d, m, L = rb.d, rb.m.reshape(n, 3, 3), rb.length
        Md = torch.einsum("nij,nj->ni", m, d)
        MtMd = torch.einsum("nji,nj->ni", m, Md)
        de = (d * ge).sum(1)
        gd = ge / L[:, None] - MtMd * (de / L**3)[:, None] + MtMd * (gL / L)[:, None]
        gM = ((gL / L - de / L**3)[:, None, None] * Md[:, :, None] * d[:, None, :]).reshape(n, 9)
        g_first, gP = go - gd, gd
        out.index_add_(0, rb.view, torch.nn.functional.pad(gM, (RAY_M, RAY_RECORD - RAY_M - 9)))
    else:
        g_first, gP = ge, go
    rec = torch.zeros(n, RAY_RECORD, device=go.device, dtype=go.dtype)
    rec[:, RAY_FIRST:RAY_FIRST + 3] = g_first
    rec[:, RAY_CENTER:RAY_CENTER + 3] = gP
    rec[:, RAY_U:RAY_U + 3] = gP * rb.c[:, None]
    rec[:, RAY_V:RAY_V + 3] = gP * rb.r[:, None]
    out.index_add_(0, rb.view, rec)
    return out


def params_grad_reference(volume: torch.Tensor, grad: torch.Tensor, params: torch.Tensor, dt_mm: torch.Tensor,
                          kind: str, method: str):
    """``(∂L/∂params (B, V, 24), ∂L/∂dt_mm (B,))`` float64 on the CPU, for ``L = ⟨grad, project(volume)⟩``.

    ``volume`` (B, X, Y, Z), ``grad`` (B, V, rows, cols), ``params`` (B, V, 24), ``dt_mm`` (B,)."""
    B, X, Y, Z = volume.shape
    _, V, rows, cols = grad.shape
    cdt = R._compute_dtype(volume.dtype)
    dev = volume.device
    prm = params.detach().to(device=dev, dtype=cdt)
    gout = grad.detach().reshape(B, -1).to(cdt)
    gp = torch.zeros(B, V, RAY_RECORD, device=dev, dtype=cdt)
    gdt = torch.zeros(B, device=dev, dtype=cdt)
    with R._walk_threads(method, min(V * rows * cols, _GRAD_CHUNK), dev):
        _params_grad_into(gp, gdt, volume, gout, prm, dt_mm, kind, rows, cols, method)
    return gp.to(device="cpu", dtype=torch.float64), gdt.to(device="cpu", dtype=torch.float64)


def _params_grad_into(gp, gdt, volume, gout, prm, dt_mm, kind, rows, cols, method):
    B, X, Y, Z = volume.shape
    V = prm.shape[1]
    cdt = gp.dtype
    for b in range(B):
        vol_b = volume[b].detach().to(cdt)
        flatvol = vol_b.reshape(-1) if method == "siddon" else R.pad_flat(vol_b)
        for start, rb in R.ray_blocks(prm[b], kind, rows, cols, _GRAD_CHUNK):
            w = gout[b, start:start + rb.o.shape[0]]
            if method == "siddon":
                go, ge, gL, gd = _siddon_ray_grads(flatvol, rb, w, (X, Y, Z))
            else:
                go, ge, gL, gd = _trilinear_ray_grads(flatvol, rb, w, (X, Y, Z), float(dt_mm[b]))
                gdt[b] += gd.sum()
            gp[b] += _to_record(rb, kind, go, ge, gL, V)


def _records_from_rays(rg, prm, kind, rows, cols, weights=None):
    """(B, V, 24) record gradients and (B,) step gradients from per-ray numbers ``rg`` (B, V·rows·cols, 7 or 8):
    ``[g_o (3), g_e (3), g_L, (g_dt)]``, times ``weights`` (B, V·rows·cols) when given. ``prm`` (B, V, 24) on
    ``rg``'s device and dtype."""
    B, V = prm.shape[:2]
    gp = rg.new_zeros(B, V, RAY_RECORD)
    gdt = rg.new_zeros(B)
    chunk = _GRAD_CHUNK if rg.device.type == "cpu" else _GRAD_CHUNK_DEVICE
    for b in range(B):
        for start, rb in R.ray_blocks(prm[b], kind, rows, cols, chunk):
            r = rg[b, start:start + rb.o.shape[0]]
            if weights is not None:
                r = r * weights[b, start:start + rb.o.shape[0], None]
            gp[b] += _to_record(rb, kind, r[:, 0:3], r[:, 3:6], r[:, 6], V)
            if r.shape[1] > 7:
                gdt[b] += r[:, 7].sum()
    return gp, gdt


def params_grad_triton(volume: torch.Tensor, grad: torch.Tensor, params: torch.Tensor, dt_mm: torch.Tensor,
                       kind: str, method: str):
    """:func:`params_grad_reference` with the per-ray pass run by the Triton kernels of
    :mod:`xwin.kernels.geomgrad_triton` (CUDA tensors, or any device under ``TRITON_INTERPRET=1``); the
    mapping onto the records stays in torch, on the volume's device."""
    from .geomgrad_triton import ray_grads

    _, V, rows, cols = grad.shape
    rg = ray_grads(volume, grad, params, dt_mm, kind, method)
    prm = params.detach().to(device=rg.device, dtype=rg.dtype)
    gp, gdt = _records_from_rays(rg, prm, kind, rows, cols)
    return gp.to(device="cpu", dtype=torch.float64), gdt.to(device="cpu", dtype=torch.float64)


def params_grad(volume, grad, params, dt_mm, kind: str, method: str, backend: str = "auto"):
    """The geometry gradient by ``backend``: ``"triton"`` (the kernels), ``"torch"`` (the reference pass) or
    ``"auto"`` (the kernels for CUDA tensors when Triton is importable, else the reference), as
    :func:`xwin.kernels._backend.resolve_backend` chooses for the forward."""
    from ._backend import resolve_backend

    if resolve_backend(backend, volume.device) == "triton":
        return params_grad_triton(volume, grad, params, dt_mm, kind, method)
    return params_grad_reference(volume, grad, params, dt_mm, kind, method)


# ------------------------------------------------------------------------------------------ the operator

_LIB = torch.library.Library("xwin", "FRAGMENT")
_LIB.define("project_geometry_grad(Tensor volume, Tensor grad, Tensor params, Tensor dt_mm, bool cone, str method, "
            "str backend=\"auto\") -> (Tensor, Tensor)")


@torch.library.impl(_LIB, "project_geometry_grad", "CompositeExplicitAutograd")
def _geometry_grad_impl(volume, grad, params, dt_mm, cone, method, backend="auto"):
    B = volume.shape[0]
    prm = params.detach().expand(B, -1, -1)
    dts = dt_mm.detach().expand(B)
    return params_grad(volume, grad, prm, dts, "cone" if cone else "parallel", method, backend)


@torch.library.register_fake("xwin::project_geometry_grad", lib=_LIB)
def _(volume, grad, params, dt_mm, cone, method, backend="auto"):
    B = volume.shape[0]
    return (params.new_empty((B, params.shape[1], params.shape[2]), dtype=torch.float64),
            dt_mm.new_empty((B,), dtype=torch.float64))


geometry_grad_op = torch.ops.xwin.project_geometry_grad.default


# ------------------------------------------------------------------------------------------ fused Siddon path

_LIB.define("project_siddon_with_ray_grads(Tensor volume, Tensor params, bool cone, int rows, int cols, "
            "bool check_finite) -> (Tensor, Tensor)")


@torch.library.impl(_LIB, "project_siddon_with_ray_grads", "CompositeExplicitAutograd")
def _fused_impl(volume, params, cone, rows, cols, check_finite):
    """The Siddon forward and, in the same voxel walk, each ray's unit-weight derivatives (g_o, g_e, g_L):
    (B, V, rows, cols) integrals (bit-identical to ``xwin::project``) and (B, V·rows·cols, 7) per-ray
    derivatives (7 numbers per ray; nothing per crossing). The backward then needs no second walk."""
    from ._prep import check_all_finite

    if check_finite:
        check_all_finite(volume, "volume")
    B, X, Y, Z = volume.shape
    V = params.shape[1]
    cdt = R._compute_dtype(volume.dtype)
    dev = volume.device
    prm = params.detach().expand(B, -1, -1).to(device=dev, dtype=cdt)
    kind = "cone" if cone else "parallel"
    out = torch.zeros(B, V * rows * cols, device=dev, dtype=cdt)
    rg = torch.zeros(B, V * rows * cols, 7, device=dev, dtype=cdt)
    with R._walk_threads("siddon", min(V * rows * cols, _GRAD_CHUNK), dev):
        for b in range(B):
            flatvol = volume[b].detach().to(cdt).reshape(-1)
            for start, rb in R.ray_blocks(prm[b], kind, rows, cols, _GRAD_CHUNK):
                n = rb.o.shape[0]
                go, ge, gL, p = _siddon_ray_grads(flatvol, rb, torch.ones(n, device=dev, dtype=cdt), (X, Y, Z))
                out[b, start:start + n] = p
                rg[b, start:start + n] = torch.cat([go, ge, gL[:, None]], 1)
    return out.reshape(B, V, rows, cols), rg


@torch.library.register_fake("xwin::project_siddon_with_ray_grads", lib=_LIB)
def _(volume, params, cone, rows, cols, check_finite):
    B, V = volume.shape[0], params.shape[1]
    dt = torch.float64 if volume.dtype == torch.float64 else torch.float32
    return volume.new_empty((B, V, rows, cols), dtype=dt), volume.new_empty((B, V * rows * cols, 7), dtype=dt)


def _fused_setup(ctx, inputs, output):
    volume, params, cone, rows, cols, _ = inputs
    ctx.meta = (cone, rows, cols, tuple(volume.shape[1:]), volume.dtype)
    ctx.save_for_backward(params, output[1])


def _fused_backward(ctx, grad, _grad_rg):
    from ._ops import backproject_op

    params, rg = ctx.saved_tensors
    cone, rows, cols, (X, Y, Z), vdt = ctx.meta
    B = grad.shape[0]
    gvol = gparams = None
    dt0 = torch.zeros(1, dtype=torch.float64)
    if ctx.needs_input_grad[0]:
        gvol = backproject_op(grad.contiguous(), params, dt0, cone, X, Y, Z, "siddon", "torch", vdt, False)
    if ctx.needs_input_grad[1]:
        prm = params.detach().expand(B, -1, -1).to(device=rg.device, dtype=rg.dtype)
        w_all = grad.detach().reshape(B, -1).to(rg.dtype)
        gp, _ = _records_from_rays(rg, prm, "cone" if cone else "parallel", rows, cols, w_all)
        gparams = gp.to(device="cpu", dtype=torch.float64)
        if params.shape[0] != B:
            gparams = gparams.sum(0, keepdim=True)
        gparams = gparams.to(params.dtype)
    return gvol, gparams, None, None, None, None


torch.library.register_autograd("xwin::project_siddon_with_ray_grads", _fused_backward, setup_context=_fused_setup,
                                lib=_LIB)
fused_siddon_op = torch.ops.xwin.project_siddon_with_ray_grads.default
