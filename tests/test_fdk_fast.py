"""The separable CPU fast path of the FDK backprojection (kernels/fdk_backproject.py: separable_axis,
backproject_separable) against the general torch reference, on circular orbits in every orientation, and the
dispatch: geometries that are not separable (tilted detectors, sheared grids) take the general path."""

import math

import numpy as np
import pytest
import torch

from _helpers import rel_err
from xwin.geometry import Geometry, circular_orbit
from xwin.kernels.fdk_backproject import (FDKBackprojectError, backproject_reference, backproject_separable,
                                          fdk_backproject, separable_axis, view_matrices)


def _affine(axis: int, spacing=(1.3, 0.9, 1.7), flip=(1, -1, 1), shift=(-4.0, 3.0, -5.0)) -> np.ndarray:
    """An axis-aligned affine whose index axis ``axis`` runs along world z (the orbits' rotation axis), with
    anisotropic spacing, a flipped axis and the grid centre off the isocentre."""
    perm = {0: (2, 0, 1), 1: (0, 2, 1), 2: (0, 1, 2)}[axis]             # world axis of index axes 0, 1, 2
    A = np.zeros((4, 4))
    for i, wa in enumerate(perm):
        A[wa, i] = spacing[i] * flip[i]
    A[:3, 3] = shift
    A[3, 3] = 1.0
    return A


def _scan(kind, *, views=9, arc=2 * math.pi, rows=6, cols=7, sid=40.0, det_offset=(0.9, -0.6), pixel=(2.1, 1.7)):
    ang = torch.linspace(0.2, 0.2 + arc, views + 1, dtype=torch.float64)[:-1] if arc >= 2 * math.pi - 1e-9 else \
        torch.linspace(0.2, 0.2 + arc, views, dtype=torch.float64)
    return circular_orbit(ang, rows=rows, cols=cols, pixel_size=pixel, sid=sid, sdd=1.5 * sid, kind=kind,
                          det_offset=det_offset)


def _compare(geom, affine, shape, *, batch=2, tol64=1e-12, tol32=3e-5, **kw):
    M = view_matrices(geom, affine)
    g = torch.Generator().manual_seed(7)
    q = torch.rand(batch, geom.num_views, geom.rows, geom.cols, dtype=torch.float64, generator=g) - 0.3
    axis = separable_axis(M, shape, geom.rows, geom.cols)
    assert axis is not None
    for dw in (True, False):
        ref = backproject_reference(q, M, shape, distance_weight=dw)
        got = backproject_separable(q, M, shape, distance_weight=dw, **kw)
        assert got.shape == ref.shape and got.dtype == torch.float64
        assert ref.abs().max() > 0
        assert rel_err(got, ref) <= tol64, (dw, rel_err(got, ref))
        got32 = backproject_separable(q.float(), M, shape, distance_weight=dw, **kw)
        ref32 = backproject_reference(q.float(), M, shape, distance_weight=dw)
        assert got32.dtype == torch.float32
        # float32: both against the float64 reference, the fast path no worse than the general path
        assert rel_err(got32, ref) <= tol32 and rel_err(got32, ref) <= 3 * rel_err(ref32, ref) + 1e-6
    return axis, M, q


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_matches_reference_in_every_orientation(kind, axis):
    shape = (5, 6, 4)
    found, _, _ = _compare(_scan(kind), _affine(axis), shape)
    assert found == axis


def test_short_scan_half_fan_behind_source_and_beyond_the_detector():
    shape = (7, 6, 5)
    # short scan (180° + a bit), detector offsets
    assert _compare(_scan("cone", arc=math.pi + 0.7, views=11), _affine(2), shape)[0] == 2
    # half fan: detector shifted by ~half its width, full circle
    assert _compare(_scan("cone", cols=8, det_offset=(6.0, 0.3)), _affine(1), shape)[0] == 1
    # source inside the volume's extent: some voxels sit at or behind the source in some views
    geom = _scan("cone", sid=6.0)
    axis, M, _ = _compare(geom, _affine(0, spacing=(1.0, 2.0, 2.5)), shape)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    w = ijk.reshape(-1, 3) @ M[:, 2, :3].T + M[:, 2, 3]
    assert (w <= 0).any() and (w > 0).any()
    # a volume much larger than the detector's field of view: zero padding on every side matters
    _compare(_scan("cone", rows=3, cols=3, pixel=(0.7, 0.8)), _affine(2, spacing=(2.0, 2.0, 2.0)), (9, 8, 7))


def test_single_pixel_rows_and_columns_and_single_voxel_lines():
    _compare(_scan("cone", rows=1, cols=5, pixel=(6.0, 1.7)), _affine(2, shift=(-1.0, 1.0, -1.0)), (4, 5, 3))
    _compare(_scan("cone", rows=5, cols=1, pixel=(2.1, 6.0)), _affine(1, shift=(-1.0, 1.0, -1.0)), (4, 5, 3))
    _compare(_scan("parallel", rows=1, cols=1, pixel=5.0), _affine(0, shift=(-1.0, 1.0, -1.0)), (1, 3, 2))


def test_blocking_does_not_change_the_result_and_progress_adds_up():
    geom = _scan("cone", views=10)
    M = view_matrices(geom, _affine(1))
    q = torch.rand(2, 10, geom.rows, geom.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    shape = (6, 5, 7)
    full = backproject_separable(q, M, shape)
    for budget in (1, 200, 3000, 40000):               # one line at a time .. several views per block
        done = []
        got = backproject_separable(q, M, shape, budget=budget, progress=done.append)
        assert torch.allclose(got, full, rtol=1e-13, atol=0)
        assert sum(done) == pytest.approx(10.0)
    for b in range(2):
        assert torch.allclose(full[b], backproject_separable(q[b], M, shape), rtol=1e-13, atol=0)


def test_tilted_detector_and_sheared_grid_take_the_general_path():
    shape = (5, 4, 6)
    base = _scan("cone")
    # detector rolled by 5° in its plane: u has a component along the rotation axis
    c, s = math.cos(0.087), math.sin(0.087)
    tilted = Geometry.cone(base.source, base.center, c * base.u + s * base.v * (1.7 / 2.1),
                           -s * base.u * (2.1 / 1.7) + c * base.v, base.rows, base.cols)
    sheared = _affine(2)
    sheared[0, 2] = 0.05
    q = torch.rand(base.num_views, base.rows, base.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for geom, aff in ((tilted, _affine(2)), (base, sheared)):
        M = view_matrices(geom, aff)
        assert separable_axis(M, shape, geom.rows, geom.cols) is None
        assert torch.equal(fdk_backproject(q, M, shape), backproject_reference(q, M, shape))
        with pytest.raises(FDKBackprojectError, match="separable"):
            backproject_separable(q, M, shape)


def test_drift_tolerance():
    """A shear far below float32 resolution (1e-13 of the spacing) still takes the fast path and matches the
    general path; 1e-4 does not take it."""
    geom = _scan("cone")
    shape = (5, 4, 6)
    for eps, expect in ((1e-13, 2), (1e-4, None)):
        aff = _affine(2)
        aff[0, 2] = eps
        M = view_matrices(geom, aff)
        assert separable_axis(M, shape, geom.rows, geom.cols) == expect
    aff = _affine(2)
    aff[0, 2] = 1e-13
    _compare(geom, aff, shape)


@pytest.mark.parametrize("n", [1, 7, 102, 129])
def test_ram_lak_filter_is_the_linear_convolution_with_the_sampled_kernel(n):
    """Ram-Lak pads to a 5-smooth length (216 for 102 columns): still exactly the linear convolution with
    h[0] = 1/4, h[odd k] = −1/(πk)², and the same as the power-of-two padding the windows use."""
    from xwin.reconstruct.filters import ramp_filter, ramp_response

    p = torch.rand(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    k = torch.arange(n, dtype=torch.float64)[:, None] - torch.arange(n, dtype=torch.float64)[None, :]
    h = torch.where(k == 0, torch.full_like(k, 0.25), torch.where(k.abs() % 2 == 1, -1 / (math.pi * k) ** 2, 0 * k))
    want = p @ h.T
    assert torch.allclose(ramp_filter(p), want, rtol=0, atol=1e-12 * float(want.abs().max()))
    n_pad = max(64, 1 << (2 * n - 1).bit_length())
    pow2 = torch.fft.irfft(torch.fft.rfft(p, n=n_pad) * ramp_response(n_pad), n=n_pad)[..., :n]
    assert torch.allclose(ramp_filter(p), pow2, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_parallel_beam_shared_rows_and_view_dependent_rows():
    """Parallel beam about the line axis puts a voxel on the same row in every view: the views are summed
    before the row interpolation (one grid_sample per line). A detector that moves along the axis from view
    to view breaks that and takes the per-view separable path; both match the general path."""
    from xwin.kernels.fdk_backproject import _shared_rows

    shape = (5, 6, 4)
    geom = _scan("parallel", views=12)
    aff = _affine(1)
    assert _shared_rows(view_matrices(geom, aff), shape)
    _compare(geom, aff, shape)
    shift = torch.linspace(-1.5, 2.0, geom.num_views, dtype=torch.float64)[:, None] * torch.tensor([[0.0, 0.0, 1.0]],
                                                                                                 dtype=torch.float64)
    moving = Geometry.parallel(geom.direction, geom.center + shift, geom.u, geom.v, geom.rows, geom.cols)
    assert not _shared_rows(view_matrices(moving, aff), shape)
    assert _compare(moving, aff, shape)[0] == 1
    assert not _shared_rows(view_matrices(_scan("cone"), aff), shape)


def test_fdk_filters_in_blocks_of_views(monkeypatch):
    """fdk() filters the projections a block of views at a time (bounded FFT temporaries): one view per block
    gives the same reconstruction, batched or not, as all views at once."""
    import xwin.reconstruct.filters as filters

    p = torch.rand(2, 10, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    aff = _affine(2)
    for kind in ("cone", "parallel"):
        geom = _scan(kind, views=10, rows=5, cols=9, det_offset=(0.0, 0.0))
        monkeypatch.setattr(filters, "_FILTER_BLOCK", 1 << 21)
        whole = filters.fdk(p, geom, (5, 6, 4), affine=aff)
        monkeypatch.setattr(filters, "_FILTER_BLOCK", 1)
        blocked = filters.fdk(p, geom, (5, 6, 4), affine=aff)
        assert whole.abs().max() > 0 and torch.allclose(blocked, whole, rtol=1e-12, atol=1e-15)
        assert torch.allclose(filters.fdk(p[1], geom, (5, 6, 4), affine=aff), whole[1], rtol=1e-12, atol=1e-15)
