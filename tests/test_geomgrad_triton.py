"""The Triton kernels of the geometry gradient (kernels/geomgrad_triton.py, under the interpreter without a
GPU) against the torch reference pass of kernels/geomgrad.py: per-ray numbers mapped onto the ray records,
float64 to ~1e-10 and float32 against the float32 reference, both methods, cone and parallel beam, batched
volumes with per-volume affines, sources inside the volume and cone rays ending inside it."""

import math

import numpy as np
import pytest
import torch

from _helpers import rel_err
from xwin.geometry import Geometry
from xwin.kernels import geomgrad, project, triton_available
from xwin.kernels import reference as R
from xwin.kernels._prep import affine_batch, min_spacing, ray_params

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEV), reason="Triton cannot run here (no CUDA, no interpreter)")

ROWS, COLS = 5, 7          # one 8 × 16 tile per view: the interpreter runs each case in about a second


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _unit(v):
    return v / np.linalg.norm(v)


def _scene(seed, kind, batch=2):
    """Random volume shape, per-volume oblique affines (B, 4, 4) and a 2-view geometry in world mm (placed by
    the first affine). Cone: view 0 has its source inside the volume, view 1 its detector centre inside
    (rays that end inside); parallel: lines in generic directions. Wide detectors: some rays miss."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(3, 7, size=3))
    n = np.array(shape, dtype=np.float64)
    a0 = np.eye(4)
    a0[:3, :3] = _rotation(rng) @ np.diag(rng.uniform(0.6, 1.6, size=3))
    a0[:3, 3] = rng.uniform(-3, 3, size=3)
    affs = [a0]
    for _ in range(batch - 1):                     # the other volumes: perturbed copies, at about the same place
        a = a0.copy()
        a[:3, :3] = a0[:3, :3] @ (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
        a[:3, 3] += 0.3 * rng.normal(size=3)
        affs.append(a)
    world = lambda idx: a0[:3, :3] @ idx + a0[:3, 3]
    centre = world((n - 1) / 2)
    radius = 0.5 * np.linalg.norm(a0[:3, :3] @ n)
    first, centers, us, vs = [], [], [], []
    for view in range(2):
        d = _unit(rng.normal(size=3))
        a = _unit(np.cross(d, rng.normal(size=3)))
        b = np.cross(d, a)
        pitch = 2.6 * radius / COLS
        if kind == "cone" and view == 0:
            src = world(rng.uniform(0.2, 0.8, size=3) * (n - 1))              # source inside the volume
            det = src + 2.5 * radius * d
        elif kind == "cone":
            det = world(rng.uniform(0.3, 0.7, size=3) * (n - 1))              # pixels inside the volume
            src = det - 3.0 * radius * d
            pitch = 2.4 * radius / COLS
        else:
            src = d
            det = centre + rng.uniform(-1.5, 1.5) * radius * d + 0.3 * radius * rng.normal(size=3)
        first.append(src)
        centers.append(det)
        us.append(a * pitch)
        vs.append(b * pitch * rng.uniform(0.8, 1.3))
    build = Geometry.cone if kind == "cone" else Geometry.parallel
    geom = build(np.array(first), np.array(centers), np.array(us), np.array(vs), ROWS, COLS)
    return shape, np.stack(affs), geom


def _inputs(seed, kind, dtype, step=0.6, batch=2):
    shape, affs, geom = _scene(seed, kind, batch)
    aff = affine_batch(affs)
    prm = ray_params(geom, aff)
    dts = step * min_spacing(aff)
    gen = torch.Generator().manual_seed(seed)
    vol = (torch.rand((batch,) + shape, generator=gen, dtype=torch.float64) + 0.25).to(dtype)
    w = (torch.rand(batch, geom.num_views, ROWS, COLS, generator=gen, dtype=torch.float64) - 0.3).to(dtype)
    return vol, w, prm, dts, shape, geom


def _coverage(prm, shape, kind):
    """(sources inside the box, rays ending inside the box, rays missing it) over the batch."""
    inside = lambda q: ((q >= -0.5) & (q < torch.tensor(shape, dtype=q.dtype) - 0.5)).all(1)
    src_in = end_in = miss = 0
    for b in range(prm.shape[0]):
        rb = R.RayBlock(prm[b], kind, ROWS, COLS, 0, prm.shape[1] * ROWS * COLS)
        t0, t1 = R.clip(rb.o, rb.e, -0.5, torch.tensor(shape, dtype=rb.o.dtype) - 0.5, rb.tlo, rb.thi, True)
        miss += int((t1 <= t0).sum())
        if kind == "cone":
            src_in += int(inside(rb.o).sum())
            end_in += int(inside(rb.o + rb.length[:, None] * rb.e).sum())
    return src_in, end_in, miss


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_kernel_equals_reference(method, kind, seed):
    """Record and step gradients of the kernel pass equal the reference pass: float64 ≤ 1e-10, float32 (against
    the float32 reference, which rounds alike) ≤ 1e-5 for the records."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        vol, w, prm, dts, shape, _ = _inputs(seed, kind, dtype)
        if dtype == torch.float64:
            src_in, end_in, miss = _coverage(prm, shape, kind)
            assert miss > 0 and (kind == "parallel" or (src_in > 0 and end_in > 0)), (src_in, end_in, miss)
        gp_ref, gdt_ref = geomgrad.params_grad_reference(vol, w, prm, dts, kind, method)
        gp, gdt = geomgrad.params_grad_triton(vol.to(DEV), w.to(DEV), prm, dts, kind, method)
        assert gp.dtype == torch.float64 and gp.shape == gp_ref.shape and gp.device.type == "cpu"
        assert gp_ref.abs().max() > 0
        assert rel_err(gp, gp_ref) <= tol, (dtype, rel_err(gp, gp_ref))
        if method == "trilinear":
            assert gdt_ref.abs().min() > 0
            # one number per volume summed over every ray with cancelling signs: in float32 the reference itself
            # is ~1e-5 from float64 here (measured 4e-6 .. 7e-6), so kernel and reference differ at that level
            assert rel_err(gdt, gdt_ref) <= (tol if dtype == torch.float64 else 5e-5)
        else:
            assert torch.count_nonzero(gdt) == 0 and torch.count_nonzero(gdt_ref) == 0


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_per_ray_numbers_and_poison(method):
    """Every element of the per-ray output is written (NaN poison), misses get zeros, and the per-ray numbers
    are the reference's (g_o, g_e, g_L, g_dt) ray by ray, for cone rays starting and ending inside."""
    from xwin.kernels.geomgrad_triton import NOUT, ray_grads

    vol, w, prm, dts, shape, geom = _inputs(3, "cone", torch.float64, batch=1)
    n = geom.num_views * ROWS * COLS
    out = torch.full((1, n, NOUT), math.nan, dtype=torch.float64, device=DEV)
    ray_grads(vol.to(DEV), w.to(DEV), prm, dts, "cone", method, out=out)
    out = out.cpu()
    assert torch.isfinite(out).all()
    rb = R.RayBlock(prm[0], "cone", ROWS, COLS, 0, n)
    flat = vol[0].reshape(-1) if method == "siddon" else R.pad_flat(vol[0])
    wf = w.reshape(-1)
    if method == "siddon":
        go, ge, gl, _ = geomgrad._siddon_ray_grads(flat, rb, wf, shape)
        gdt = torch.zeros_like(gl)
        assert gl.abs().max() > 0                 # some rays end inside the volume
    else:
        go, ge, gl, gdt = geomgrad._trilinear_ray_grads(flat, rb, wf, shape, float(dts[0]))
    ref = torch.cat([go, ge, gl[:, None], gdt[:, None]], 1)
    t0, t1 = R.clip(rb.o, rb.e, -0.5 if method == "siddon" else -1.0,
                    torch.tensor(shape, dtype=torch.float64) - (0.5 if method == "siddon" else 0.0), rb.tlo, rb.thi,
                    method == "siddon")
    miss = t1 <= t0
    assert miss.any() and (~miss).any()
    assert torch.count_nonzero(out[0][miss]) == 0
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-12)


def test_int64_offsets_and_half_storage(monkeypatch):
    """The int64-offset variant (forced) and float16/bfloat16 volumes (float32 arithmetic) compute the same."""
    from xwin.kernels import geomgrad_triton

    vol, w, prm, dts, _, _ = _inputs(4, "cone", torch.float32)
    a = geomgrad.params_grad_triton(vol.to(DEV), w.to(DEV), prm, dts, "cone", "siddon")
    monkeypatch.setattr(geomgrad_triton, "_INT32_MAX", 8)
    b = geomgrad.params_grad_triton(vol.to(DEV), w.to(DEV), prm, dts, "cone", "siddon")
    monkeypatch.undo()
    assert torch.equal(a[0], b[0])
    for dtype in (torch.float16, torch.bfloat16):
        v16 = vol.to(dtype)
        got = geomgrad.params_grad_triton(v16.to(DEV), w.to(DEV), prm, dts, "cone", "trilinear")
        ref = geomgrad.params_grad_reference(v16, w, prm, dts, "cone", "trilinear")
        assert rel_err(got[0], ref[0]) <= 1e-5 and rel_err(got[1], ref[1]) <= 1e-5


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_axis_parallel_rays_that_miss_give_finite_gradients(method):
    """A ray parallel to a voxel axis and outside the volume has an infinite entry time; its (zero) terms must
    not turn the gradient into NaN (the reference did, 0·inf), in the kernel and in the reference."""
    gen = torch.Generator().manual_seed(8)
    vol = torch.rand(1, 4, 5, 3, dtype=torch.float64, generator=gen) + 0.5
    g = Geometry.parallel([[1.0, 0.0, 0.0]], [[10.0, 2.1, 1.2]], [[0.0, 1.3, 0.0]], [[0.0, 0.0, 1.1]], 3, COLS)
    prm = ray_params(g, affine_batch(None))
    dts = torch.full((1,), 0.6, dtype=torch.float64)
    w = torch.rand(1, 1, 3, COLS, dtype=torch.float64, generator=gen)
    ref = geomgrad.params_grad_reference(vol, w, prm, dts, "parallel", method)
    got = geomgrad.params_grad_triton(vol.to(DEV), w.to(DEV), prm, dts, "parallel", method)
    assert torch.isfinite(ref[0]).all() and torch.isfinite(ref[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_dispatch_by_backend(monkeypatch):
    """The op runs the reference for backend 'torch' and for 'auto' on CPU tensors (the CPU path is unchanged),
    and the kernels for 'triton'."""
    calls = []
    real = geomgrad.params_grad_triton
    monkeypatch.setattr(geomgrad, "params_grad_triton", lambda *a: calls.append("triton") or real(*a))
    vol, w, prm, dts, _, _ = _inputs(5, "parallel", torch.float64, batch=1)
    ref = geomgrad.geometry_grad_op(vol, w, prm, dts[:1], False, "siddon")
    assert calls == []
    assert torch.equal(geomgrad.geometry_grad_op(vol, w, prm, dts[:1], False, "siddon", "torch")[0], ref[0])
    assert calls == []
    got = geomgrad.geometry_grad_op(vol.to(DEV), w.to(DEV), prm, dts[:1], False, "siddon", "triton")
    assert calls == ["triton"]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_public_api_gradient_equals_reference(method, monkeypatch):
    """``project(..., backend="triton")`` with the geometry's tensors and the affine requiring grad: their
    gradients equal the torch backend's (volume gradient too, in the same backward)."""
    calls = []
    real = geomgrad.params_grad_triton
    monkeypatch.setattr(geomgrad, "params_grad_triton", lambda *a: calls.append(1) or real(*a))
    _, affs, g = _scene(6, "cone", batch=1)
    gen = torch.Generator().manual_seed(6)
    vol = torch.rand(4, 5, 3, dtype=torch.float64, generator=gen) + 0.25
    w = torch.rand(g.num_views, ROWS, COLS, dtype=torch.float64, generator=gen)
    grads = {}
    for backend in ("torch", "triton"):
        args = [t.clone().requires_grad_() for t in (g.source, g.center, g.u, g.v, torch.as_tensor(affs[0]))]
        x = vol.clone().to(DEV).requires_grad_()
        geo = Geometry.cone(*args[:4], ROWS, COLS)
        out = project(x, geo, affine=args[4], method=method, step=0.6, backend=backend)
        (out * w.to(DEV)).sum().backward()
        grads[backend] = [a.grad for a in args] + [x.grad.cpu()]
    for got, ref in zip(grads["triton"], grads["torch"]):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    assert calls, "the triton backend's geometry gradient did not go through the kernel"
