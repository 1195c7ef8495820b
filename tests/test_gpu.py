"""GPU checks (skipped without CUDA): Triton kernels on the card against the reference, at realistic sizes."""

import numpy as np
import pytest
import torch

from _helpers import rel_err
from xwin.geometry import circular_orbit, xwin_pose
from xwin.kernels import backproject, geomgrad, project
from xwin.kernels._prep import affine_batch, min_spacing, ray_params

pytestmark = pytest.mark.gpu


def _ct_like(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 0.03


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_gpu_matches_reference(method, kind):
    vol = _ct_like((96, 80, 40))
    aff = np.diag([0.9, 0.9, 2.5, 1.0])
    aff[:3, 3] = [-43, -36, -50]
    g = circular_orbit(torch.linspace(0, 3, 4), rows=48, cols=64, pixel_size=1.8, sid=600, sdd=1000, kind=kind)
    ref = project(vol.double(), g, affine=aff, method=method, backend="torch")
    got = project(vol.cuda(), g, affine=aff, method=method)
    assert got.is_cuda
    # float32 on the card, FMA contraction: a slightly looser bound than the interpreter's 1e-5
    assert rel_err(got, ref) <= 2e-5
    y = torch.rand(4, 48, 64, generator=torch.Generator().manual_seed(1))
    bref = backproject(y.double(), g, vol.shape, affine=aff, method=method, backend="torch")
    bgot = backproject(y.cuda(), g, vol.shape, affine=aff, method=method)
    assert rel_err(bgot, bref) <= 2e-5


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_gpu_dot_test_and_batch(method):
    x = _ct_like((4, 64, 64, 48)).cuda()
    g = xwin_pose(torch.tensor([-30.0, 0.0, 45.0]), size=96, pixel_size=2.0, isocenter=(32, 32, 24))
    p = project(x, g, method=method)
    y = torch.rand_like(p)
    bp = backproject(y, g, x.shape[1:], method=method)
    lhs, rhs = (p.double() * y.double()).sum(), (x.double() * bp.double()).sum()
    assert abs(lhs - rhs) / abs(lhs) <= 1e-5
    for b in range(4):
        assert rel_err(p[b], project(x[b], g, method=method)) <= 1e-6


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_gpu_geometry_gradient_matches_cpu(method):
    """The geometry gradient through the public API on the card (the Triton per-ray kernels of
    kernels/geomgrad_triton.py) equals the CPU float64 one (the torch reference pass)."""
    from xwin.geometry import Geometry

    vol = _ct_like((64, 56, 40)).double()
    g0 = circular_orbit([0.4], rows=24, cols=32, pixel_size=2.5, sid=300, sdd=500, isocenter=(32, 28, 20))
    grads = []
    for dev in ("cpu", "cuda"):
        src = g0.source.clone().requires_grad_()
        out = project(vol.to(dev), Geometry.cone(src, g0.center, g0.u, g0.v, 24, 32), method=method)
        out.square().sum().backward()
        grads.append(src.grad.cpu())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_gpu_geometry_gradient_kernel_matches_cpu_reference(method, kind, monkeypatch):
    """The geometry-gradient kernels on the card (kernels/geomgrad_triton.py, chosen by the op for CUDA tensors)
    against the CPU float64 reference pass: record and step gradients, float64 and float32 volumes, two
    volumes with their own oblique affines, a source inside the volume."""
    calls = []
    real = geomgrad.params_grad_triton
    monkeypatch.setattr(geomgrad, "params_grad_triton", lambda *a: calls.append(1) or real(*a))
    _geometry_gradient_case(method, kind)
    assert calls == [1, 1]


def _geometry_gradient_case(method, kind, device="cuda"):
    """(Also runs on the CPU under the Triton interpreter with ``device="cpu"``: about a minute per case.)"""
    shape = (48, 40, 32)
    aff = np.stack([np.eye(4), np.eye(4)])
    aff[0, :3, :3] = [[0.9, 0.1, 0.0], [-0.1, 0.95, 0.05], [0.0, -0.05, 1.4]]
    aff[1, :3, :3] = [[0.92, 0.08, 0.02], [-0.12, 0.9, 0.05], [0.01, -0.04, 1.5]]
    aff[:, :3, 3] = [[-20.0, -18.0, -22.0], [-21.0, -17.0, -23.0]]
    g = circular_orbit(torch.tensor([0.3, 1.9]), rows=24, cols=32, pixel_size=2.4, sid=120 if kind == "cone" else 600,
                       sdd=500, kind=kind)
    if kind == "cone":         # view 1's source inside the volume
        g = type(g).cone(torch.stack([g.source[0], torch.tensor([1.0, -2.0, 0.5], dtype=g.source.dtype)]),
                         g.center, g.u, g.v, g.rows, g.cols)
    affb = affine_batch(aff)
    prm, dts = ray_params(g, affb), 0.5 * min_spacing(affb)
    gen = torch.Generator().manual_seed(3)
    vol = torch.rand((2,) + shape, generator=gen, dtype=torch.float64) * 0.03
    w = torch.rand(2, 2, 24, 32, generator=gen, dtype=torch.float64) - 0.3
    ref_gp, ref_gdt = geomgrad.params_grad_reference(vol, w, prm, dts, kind, method)
    assert ref_gp.abs().max() > 0
    # float32 bound: 10× the CPU float32 reference's own distance from float64 (cancellation makes that large for
    # some sums: measured 7e-7 .. 3e-4 for the records and up to 4e-3 for the trilinear step at these sizes)
    ref32 = geomgrad.params_grad_reference(vol.float(), w.float(), prm, dts, kind, method)
    tol32 = [10 * rel_err(r32, r) + 1e-6 for r32, r in zip(ref32, (ref_gp, ref_gdt))]
    for dtype, tols in ((torch.float64, (1e-9, 1e-9)), (torch.float32, tol32)):
        gp, gdt = geomgrad.params_grad(vol.to(device, dtype), w.to(device, dtype), prm, dts, kind, method,
                                       "auto" if device == "cuda" else "triton")
        assert gp.device.type == "cpu" and gp.dtype == torch.float64
        assert rel_err(gp, ref_gp) <= tols[0], (dtype, rel_err(gp, ref_gp), tols)
        if method == "trilinear":
            assert rel_err(gdt, ref_gdt) <= tols[1], (dtype, rel_err(gdt, ref_gdt), tols)
