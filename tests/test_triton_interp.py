"""Triton kernels (under the interpreter without a GPU) against the float64 torch reference."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from _helpers import rel_err, scenes
from xwin.geometry import circular_orbit
from xwin.kernels import backproject, project, triton_available
from xwin.kernels._prep import affine_batch, ray_params

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEV), reason="Triton cannot run here (no CUDA, no interpreter)")


def _volume(shape, seed, dtype=torch.float32, batch=None):
    g = torch.Generator().manual_seed(seed)
    full = (batch,) + tuple(shape) if batch else tuple(shape)
    return (torch.rand(full, generator=g, dtype=torch.float64) + 0.25).to(dtype)


def _check(got, ref, tol):
    if ref.abs().max() == 0:
        assert torch.count_nonzero(got) == 0
    else:
        assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_random_scenes_forward_and_adjoint(method):
    """Random cone/parallel scenes (misses, grazing faces, axis-parallel rays, close sources, anisotropic and
    oblique affines): the kernels equal the reference in float64 (≤ 1e-9) and in float32 (≤ 1e-5).

    Why float32 is compared with the float32 reference: a nearly axis-parallel ray crossing a voxel face at
    a shallow angle turns a last-bit difference of its position into a visible change of the crossing point
    (the exact integral really is that sensitive), so float32 results of *any* implementation can differ
    from float64 by more than 1e-5 on such rays. The float64 run checks the kernels' logic exactly; the
    float32 run checks the float32 path against a reference rounding the same way.
    """
    @settings(max_examples=20 if method == "siddon" else 12, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(scenes(max_size=7))
    def prop(scene):
        shape, affine, geom = scene
        y = _volume((geom.num_views, geom.rows, geom.cols), 12)
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
            x = _volume(shape, 11, dtype)
            ref = project(x, geom, affine=affine, method=method, backend="torch")
            got = project(x.to(DEV), geom, affine=affine, method=method, backend="triton")
            assert got.dtype == dtype
            _check(got, ref, tol)
            bref = backproject(y.to(dtype), geom, shape, affine=affine, method=method, backend="torch")
            bgot = backproject(y.to(dtype).to(DEV), geom, shape, affine=affine, method=method, backend="triton")
            _check(bgot, bref, tol)

    prop()


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_dot_test_triton(method, dtype, tol, kind):
    x = _volume((6, 7, 5), 1, dtype, batch=2).to(DEV)
    aff = np.array([[0.9, 0.2, 0, 1], [0.1, 1.1, 0.3, -2], [0, -0.2, 1.5, 0.5], [0, 0, 0, 1]])
    g = circular_orbit(torch.linspace(0, 3, 3), rows=7, cols=9, pixel_size=1.4, sid=25, sdd=45,
                       isocenter=(3, 3, 4), kind=kind)
    y = _volume((3, 7, 9), 2, dtype, batch=2).to(DEV)
    lhs = (project(x, g, affine=aff, method=method, backend="triton").double() * y.double()).sum()
    rhs = (x.double() * backproject(y, g, x.shape[1:], affine=aff, method=method, backend="triton").double()).sum()
    assert abs(lhs - rhs) / abs(lhs) <= tol


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_every_output_written(method):
    """Poison the output buffer: every pixel, hit or miss, must be overwritten."""
    from xwin.kernels import _triton

    x = _volume((5, 6, 7), 3, batch=2).to(DEV)
    g = circular_orbit(torch.linspace(0, 2, 3), rows=5, cols=19, pixel_size=2.0, sid=25, sdd=45, isocenter=(2, 2.5, 3))
    aff = affine_batch(None, 2)
    prm = ray_params(g, aff)
    out = torch.full((2, 3, 5, 19), float("nan"), device=DEV)
    _triton.forward(x, prm, "cone", 5, 19, method, torch.full((2,), 0.5, dtype=torch.float64), out=out)
    assert torch.isfinite(out).all()
    ref = project(x.double().cpu(), g, method=method, backend="torch")
    assert rel_err(out, ref) <= 1e-5
    assert (out == 0).any() and (out > 0).any()       # the wide detector has rays that miss


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_int64_offset_path(method, monkeypatch):
    """Force the int64-offset variant (used past 2^31 elements) and check it computes the same thing."""
    from xwin.kernels import _triton

    x = _volume((5, 4, 6), 4, batch=3).to(DEV)
    g = circular_orbit(torch.linspace(0, 2, 2), rows=4, cols=5, pixel_size=1.5, sid=20, sdd=40, isocenter=(2, 1.5, 2.5))
    a = project(x, g, method=method, backend="triton")
    monkeypatch.setattr(_triton, "_INT32_MAX", 8)
    b = project(x, g, method=method, backend="triton")
    y = torch.rand_like(b)
    bb = backproject(y, g, x.shape[1:], method=method, backend="triton")
    monkeypatch.undo()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert rel_err(bb, backproject(y.double(), g, x.shape[1:], method=method, backend="torch")) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_triton(dtype):
    x = _volume((6, 5, 4), 5).to(dtype).to(DEV)
    g = circular_orbit([0.3, 1.1], rows=4, cols=4, pixel_size=1.6, sid=20, sdd=40, isocenter=(2.5, 2, 1.5))
    got = project(x, g, backend="triton")
    assert got.dtype == torch.float32
    assert rel_err(got, project(x.double().cpu(), g, backend="torch")) <= 1e-5


def test_autograd_through_triton_matches_reference():
    x = _volume((4, 5, 6), 6).to(DEV).requires_grad_()
    g = circular_orbit([0.3, 1.1], rows=3, cols=4, pixel_size=1.6, sid=20, sdd=40, isocenter=(1.5, 2, 2.5))
    w = _volume((2, 3, 4), 7).to(DEV)
    (project(x, g, method="trilinear", backend="triton") * w).sum().backward()
    xr = x.detach().double().cpu().requires_grad_()
    (project(xr, g, method="trilinear", backend="torch") * w.double().cpu()).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-5


def test_shallow_crossing_regression():
    """Found by hypothesis: a parallel ray at 0.08° to the y axis crossing an x face. float32 kernel and
    float32 reference agree; the float64 kernel agrees with the float64 reference."""
    from xwin.geometry import Geometry

    affine = np.diag([0.7448185, 0.9337486, 1.04897638, 1.0])
    geom = Geometry.parallel([[0.0010, 1.0000, 0.0000]], [[4.2073, 11.4194, 0.5442]],
                             [[0.6458, -0.0006, -0.2418]], [[-2.4178e-01, 2.4178e-04, -6.4584e-01]], 3, 5)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        x = _volume((7, 7, 2), 11, dtype)
        ref = project(x, geom, affine=affine, backend="torch")
        assert rel_err(project(x.to(DEV), geom, affine=affine, backend="triton"), ref) <= tol


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the kernels' 1/e = inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [-1e-39, 1e-35, 1e-20])
def test_nearly_axis_parallel_rays_match_reference(dtype, tiny):
    """Direction components far below rounding (float32-denormal down to 1e-20): the kernels' inf/huge
    crossing times and the reference's finite stand-in give the same, finite projections and adjoints."""
    from xwin.geometry import Geometry

    vol = _volume((6, 7, 5), 3, dtype)
    y = _volume((1, 3, 4), 4, dtype)
    g = Geometry.parallel([1.0, tiny, 0.0], [2.5, 3.1, 2.2], [0, 0.9, 0], [0, 0, 1.3], 3, 4).to(DEV)
    vol, y = vol.to(DEV), y.to(DEV)
    got = project(vol, g, method="siddon", backend="triton")
    ref = project(vol, g, method="siddon", backend="torch")
    assert torch.isfinite(got).all() and got.min() > 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    got = backproject(y, g, vol.shape, method="siddon", backend="triton")
    ref = backproject(y, g, vol.shape, method="siddon", backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denormal_direction_on_the_outer_face_is_finite(dtype):
    """Found by hypothesis: a parallel ray entering on the volume's outer face with a direction component
    that is denormal in float32 made 1/e overflow and (c − p)·inf NaN in the kernel; such axes are never
    crossed, in the kernel as in the reference."""
    from xwin.geometry import Geometry

    aff = np.array([[1.92469312e+000, -7.39752642e-048, -2.09692086e-129, 9.40754712e-293],
                    [2.63397597e-149, -1.91983389e-001, -8.93411869e-001, -3.48349740e+000],
                    [-2.09764083e-128, 8.91462268e-001, -1.92403251e-001, -2.73712214e+000], [0, 0, 0, 1.0]])
    g = Geometry.parallel([[1.0, 0.0, 0.0], [1.0, 1.2168e-41, 0.0]],
                          [[15.0608, -4.6649, -1.5923], [13.5976, -4.6649, -1.5923]],
                          [[0.0, -3.8905, 2.4316], [1.9570e-41, -1.6083, 1.0052]],
                          [[0.0, -2.9179, -4.6686], [6.1157e-42, -5.0260e-01, -8.0416e-01]], 2, 3)
    x = _volume((7, 4, 3), 11, dtype)
    ref = project(x, g, affine=aff, backend="torch")
    got = project(x.to(DEV), g, affine=aff, backend="triton")
    assert torch.isfinite(got).all() and ref.abs().max() > 0
    assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_geometry_gradients_with_the_triton_backend(method):
    """With the Triton backend the geometry gradient (the per-ray pass, run on the data's device) equals the
    torch backend's, in float64, next to the kernels' volume gradient."""
    from xwin.geometry import Geometry

    g0 = circular_orbit([0.3, 1.4], rows=3, cols=4, pixel_size=1.7, sid=20, sdd=35, isocenter=(2.1, 2.4, 1.6))
    x = _volume((5, 6, 4), 8, torch.float64)
    grads = {}
    for backend in ("torch", "triton"):
        src = g0.source.clone().requires_grad_()
        u = g0.u.clone().requires_grad_()
        xv = x.to(DEV).requires_grad_()
        out = project(xv, Geometry.cone(src, g0.center, u, g0.v, 3, 4), method=method, step=0.4, backend=backend)
        out.square().sum().backward()
        grads[backend] = (src.grad, u.grad, xv.grad.cpu())
    for a, b in zip(grads["torch"], grads["triton"]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
