"""GPU checks (skipped without CUDA): Triton kernels on the card against the reference, at realistic sizes."""

import numpy as np
import pytest
import torch

from _helpers import rel_err
from xwin.geometry import circular_orbit, xwin_pose
from xwin.kernels import backproject, project

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
    """The geometry gradient (the per-ray reference pass, run on the card next to the Triton forward) equals
    the CPU float64 one."""
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
