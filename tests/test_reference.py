"""The torch reference projector: analytic cases, an independent oracle, adjointness, gradients, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings

from _helpers import AmbiguousRay, rel_err, scenes, siddon_oracle
from xwin.geometry import Geometry, GeometryError, circular_orbit
from xwin.kernels import ProjectorInputError, backproject, project


def box_parallel(direction, center, u, v, rows=1, cols=1):
    return Geometry.parallel(direction, center, u, v, rows, cols)


# ---------------------------------------------------------------- analytic chord lengths
@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_uniform_box_along_each_axis(method):
    vol = torch.ones(6, 7, 8, dtype=torch.float64)
    spacing = (0.7, 1.3, 2.5)
    aff = np.diag(list(spacing) + [1.0])
    c = [0.7 * 2.5, 1.3 * 3.0, 2.5 * 3.5]
    for ax, (n, s) in enumerate(zip(vol.shape, spacing)):
        d = [0.0, 0.0, 0.0]
        d[ax] = 1.0
        others = [a for a in range(3) if a != ax]
        u = [0.0] * 3
        u[others[0]] = 0.3
        v = [0.0] * 3
        v[others[1]] = 0.3
        g = box_parallel(d, c, u, v, rows=3, cols=3)
        p = project(vol, g, affine=aff, method=method, step=0.05)
        # Siddon: exactly the box length; trilinear: the interpolant ramps to 0 over half a voxel on each
        # side beyond the outer voxel centres, (n-1)·s + 2·(s/2) = n·s as well.
        assert torch.allclose(p, torch.full_like(p, n * s), rtol=1e-3 if method == "trilinear" else 1e-12)


def test_uniform_box_diagonal_and_oblique_chords():
    vol = torch.ones(10, 10, 10, dtype=torch.float64)
    # space diagonal through the centre of a 10 mm cube: 10·√3
    g = box_parallel([1, 1, 1], [4.5, 4.5, 4.5], [1, -1, 0], [1, 1, -2])
    assert project(vol, g).item() == pytest.approx(10 * math.sqrt(3), rel=1e-12)
    # in-plane 30° ray through the centre: the chord is 10 / cos 30°
    th = math.radians(30)
    g = box_parallel([math.cos(th), math.sin(th), 0], [4.5, 4.5, 4.5], [-math.sin(th), math.cos(th), 0], [0, 0, 1])
    assert project(vol, g).item() == pytest.approx(10 / math.cos(th), rel=1e-12)
    # cone beam ending inside the box: source outside, pixel at the centre -> half the length
    g = Geometry.cone([-20.0, 4.5, 4.5], [4.5, 4.5, 4.5], [0, 1, 0], [0, 0, 1], 1, 1)
    assert project(vol, g).item() == pytest.approx(5.0, rel=1e-12)


def test_miss_gives_zero_and_partial_hits():
    vol = torch.rand(5, 5, 5, dtype=torch.float64) + 1
    g = box_parallel([1, 0, 0], [2, 20, 2], [0, 1, 0], [0, 0, 1], rows=2, cols=2)
    assert torch.equal(project(vol, g), torch.zeros(1, 2, 2, dtype=torch.float64))
    # a detector straddling the edge: rays outside are 0, rays inside positive
    g = box_parallel([1, 0, 0], [2, 4.0, 2], [0, 1, 0], [0, 0, 1], rows=1, cols=4)
    p = project(vol, g)[0, 0]
    assert (p[:2] > 0).all() and (p[3:] == 0).all()


def test_world_units_scale_with_spacing():
    vol = torch.rand(4, 5, 6, dtype=torch.float64)
    g = circular_orbit([0.3, 1.2], rows=4, cols=5, pixel_size=2.0, sid=50, sdd=90, isocenter=(3, 4, 5))
    a = project(vol, g, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    g1 = circular_orbit([0.3, 1.2], rows=4, cols=5, pixel_size=1.0, sid=25, sdd=45, isocenter=(1.5, 2, 2.5))
    b = project(vol, g1)
    assert torch.allclose(a, 2 * b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- independent oracle
@settings(max_examples=40, deadline=None)
@given(scenes(max_size=6))
def test_siddon_reference_matches_sorting_oracle(scene):
    shape, affine, geom = scene
    vol = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    got = project(vol, geom, affine=affine, method="siddon", backend="torch")
    try:
        want = siddon_oracle(vol.numpy(), affine, geom)
    except AmbiguousRay:
        assume(False)
    assert rel_err(got, torch.from_numpy(want)) <= 1e-9


# ---------------------------------------------------------------- adjointness and gradients
@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_dot_test_reference(method, dtype, tol, kind):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 7, 8, 9, dtype=dtype, generator=gen)
    aff = torch.tensor([[0.9, 0.2, 0, 1], [0.1, 1.1, 0.3, -2], [0, -0.2, 1.5, 0.5], [0, 0, 0, 1]], dtype=torch.float64)
    g = circular_orbit(torch.linspace(0, 3, 4), rows=9, cols=10, pixel_size=1.4, sid=30, sdd=55,
                       isocenter=(4, 4, 6), kind=kind)
    y = torch.rand(2, 4, 9, 10, dtype=dtype, generator=gen)
    lhs = (project(x, g, affine=aff, method=method).double() * y.double()).sum()
    rhs = (x.double() * backproject(y, g, x.shape[1:], affine=aff, method=method).double()).sum()
    assert abs(lhs - rhs) / abs(lhs) <= tol


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_gradcheck_reference(method):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3, 2, 4, dtype=torch.float64, generator=gen).requires_grad_()
    g = circular_orbit([0.2, 1.9], rows=2, cols=3, pixel_size=1.3, sid=12, sdd=25, isocenter=(1, 0.5, 1.5))
    assert torch.autograd.gradcheck(lambda v: project(v, g, method=method), (x,))
    y = torch.rand(2, 2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: backproject(p, g, (3, 2, 4), method=method), (y,))


def test_batch_matches_single_and_per_volume_affines():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 5, 6, 7, dtype=torch.float64, generator=gen)
    affs = np.stack([np.diag([1.0 + 0.2 * i, 1.0, 0.8, 1.0]) for i in range(3)])
    g = circular_orbit([0.1, 0.9], rows=5, cols=6, pixel_size=1.5, sid=30, sdd=50, isocenter=(2, 2, 2))
    batch = project(x, g, affine=affs)
    for i in range(3):
        assert torch.equal(batch[i], project(x[i], g, affine=affs[i]))


# ---------------------------------------------------------------- trilinear convergence
def test_trilinear_converges_and_agrees_with_siddon_on_smooth_volume():
    n = 24
    ii = torch.arange(n, dtype=torch.float64)
    X, Y, Z = torch.meshgrid(ii, ii, ii, indexing="ij")
    c = (n - 1) / 2
    smooth = torch.exp(-((X - c) ** 2 + (Y - c) ** 2 + (Z - c) ** 2) / (2 * 5.0 ** 2))
    g = circular_orbit(torch.linspace(0, 2, 3) + 0.17, rows=12, cols=12, pixel_size=1.8, sid=60, sdd=100,
                       isocenter=(c, c, c))
    fine = project(smooth, g, method="trilinear", step=0.01)
    errs = [rel_err(project(smooth, g, method="trilinear", step=s), fine) for s in (0.8, 0.4, 0.2)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 2e-3
    # Siddon integrates the nearest-voxel volume, trilinear the interpolant: on a smooth volume (σ = 5
    # voxels) they differ by the O(h²/σ²) smoothing of each model (measured here: 9.1e-3 relative).
    assert rel_err(project(smooth, g, method="siddon"), fine) < 1.5e-2


# ---------------------------------------------------------------- low-precision storage
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_accumulates_in_float32(dtype):
    x = torch.rand(6, 6, 6, generator=torch.Generator().manual_seed(6))
    g = circular_orbit([0.4], rows=4, cols=4, pixel_size=2, sid=30, sdd=50, isocenter=(2.5, 2.5, 2.5))
    p = project(x.to(dtype), g)
    assert p.dtype == torch.float32
    assert rel_err(p, project(x.to(dtype).double(), g)) < 1e-6
    xr = x.to(dtype).requires_grad_()
    project(xr, g).sum().backward()
    assert xr.grad.dtype == dtype


# ---------------------------------------------------------------- bad input
def test_bad_input_errors():
    g = circular_orbit([0.0], rows=2, cols=2, pixel_size=1, sid=10, sdd=20)
    with pytest.raises(ProjectorInputError, match="shape"):
        project(torch.zeros(4, 4), g)
    with pytest.raises(ProjectorInputError, match="shape"):
        project(torch.zeros(1, 1, 4, 4, 4), g)
    with pytest.raises(ProjectorInputError, match="empty"):
        project(torch.zeros(0, 4, 4), g)
    with pytest.raises(ProjectorInputError, match="float"):
        project(torch.zeros(4, 4, 4, dtype=torch.int16), g)
    with pytest.raises(ProjectorInputError, match="Tensor"):
        project(np.zeros((4, 4, 4)), g)
    with pytest.raises(ProjectorInputError, match="affine"):
        project(torch.zeros(2, 4, 4, 4), g, affine=np.stack([np.eye(4)] * 3))
    with pytest.raises(ProjectorInputError, match="NaN"):
        project(torch.zeros(4, 4, 4), g, affine=np.full((4, 4), np.nan))
    with pytest.raises(ProjectorInputError, match="singular"):
        project(torch.zeros(4, 4, 4), g, affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ProjectorInputError, match="method"):
        project(torch.zeros(4, 4, 4), g, method="joseph")
    with pytest.raises(ProjectorInputError, match="step"):
        project(torch.zeros(4, 4, 4), g, method="trilinear", step=0)
    with pytest.raises(ProjectorInputError, match="backend"):
        project(torch.zeros(4, 4, 4), g, backend="cuda")
    with pytest.raises(ProjectorInputError, match="geometry"):
        project(torch.zeros(4, 4, 4), "cone")
    with pytest.raises(ProjectorInputError, match="geometry describes"):
        backproject(torch.zeros(2, 3, 3), g, (4, 4, 4))
    with pytest.raises(ProjectorInputError, match="volume_shape"):
        backproject(torch.zeros(1, 2, 2), g, (4, 4))


def test_geometry_errors():
    with pytest.raises(GeometryError, match="NaN"):
        Geometry.cone([0, 0, float("nan")], [0, 0, 0], [1, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="zero length"):
        Geometry.cone([0, 0, 10], [0, 0, 0], [0, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="parallel"):
        Geometry.cone([0, 0, 10], [0, 0, 0], [1, 0, 0], [2, 0, 0], 2, 2)
    with pytest.raises(GeometryError, match="detector plane"):
        Geometry.cone([5, 3, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="detector plane"):
        Geometry.parallel([1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="shape"):
        Geometry.cone([0, 10], [0, 0, 0], [1, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="views"):
        Geometry.cone(np.zeros((2, 3)) + [0, 0, 10], np.zeros((3, 3)), [1, 0, 0], [0, 1, 0], 2, 2)
    with pytest.raises(GeometryError, match="at least one"):
        Geometry.cone([0, 0, 10], [0, 0, 0], [1, 0, 0], [0, 1, 0], 0, 2)


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_volumes_past_2_to_the_24_voxels(method):
    """Flat indices past 2^24 (float32's integer limit) and near the end of a 17.6 M-voxel volume."""
    vol = torch.zeros(260, 260, 260)
    vol[258, 255:258, 100:103] = 1.0                 # flat index ≈ 17.4 M
    # a parallel ray along y through voxel (258, *, 101): crosses the 3-voxel block -> 3 mm (Siddon)
    g = Geometry.parallel([0, 1, 0], [258.0, 130.0, 101.0], [1, 0, 0], [0, 0, 1], 1, 1)
    p = project(vol, g, method=method, step=0.05)
    assert p.item() == pytest.approx(3.0, rel=2e-2 if method == "trilinear" else 1e-6)
    bp = backproject(torch.ones(1, 1, 1), g, vol.shape, method=method, step=0.05)
    assert bp[258, 255:258, 101].sum().item() == pytest.approx(3.0, rel=2e-2 if method == "trilinear" else 1e-6)
    assert bp[258, 100:200, 101].sum().item() == pytest.approx(100.0, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [-1e-39, 1e-35, 1e-20, -1e-12])
def test_nearly_axis_parallel_rays_are_finite_and_match_parallel(dtype, tiny):
    """Direction components far below a voxel per ray length (the walk keeps their crossing times finite
    instead of inf) give the result of the exactly axis-parallel ray, forward and adjoint, with no NaN."""
    gen = torch.Generator().manual_seed(3)
    vol = torch.rand(6, 7, 5, generator=gen, dtype=dtype)
    y = torch.rand(1, 3, 4, generator=gen, dtype=dtype)
    out = {}
    for d in (0.0, tiny):
        g = Geometry.parallel([1.0, d, 0.0], [2.5, 3.1, 2.2], [0, 0.9, 0], [0, 0, 1.3], 3, 4)
        out[d] = (project(vol, g, method="siddon"), backproject(y, g, vol.shape, method="siddon"))
    for a, b in zip(out[0.0], out[tiny]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert out[0.0][0].min() > 0  # every ray crosses the volume: the comparison is not vacuous
