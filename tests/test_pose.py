"""SE(3) poses of geometries: so(3) exp/log, posed geometries (differentiable), pose metrics, xwin_pose with
tensors that require grad."""

import math

import numpy as np
import pytest
import torch

from xwin.geometry import circular_orbit, xwin_pose
from xwin.kernels import project
from xwin.pose import (apply_pose, mtre, pose_points, random_pose, rotation_distance, so3_exp, so3_log,
                       translation_distance, volume_center, volume_corners)


def test_so3_exp_log_round_trip_and_orthogonality():
    gen = torch.Generator().manual_seed(0)
    axes = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64, generator=gen), dim=1)
    angles = torch.cat([torch.tensor([0.0, 1e-9, 1e-5, math.pi - 1e-4, math.pi - 1e-9]),
                        torch.rand(45, dtype=torch.float64, generator=gen) * math.pi])
    w = axes * angles[:, None]
    Rm = so3_exp(w)
    eye = torch.eye(3, dtype=torch.float64).expand_as(Rm)
    torch.testing.assert_close(Rm @ Rm.transpose(1, 2), eye, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(Rm), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(so3_exp(so3_log(Rm)), Rm, atol=1e-9, rtol=0)
    keep = angles < math.pi - 1e-3        # near π the axis sign is ambiguous; the matrices above agree
    torch.testing.assert_close(so3_log(Rm)[keep], w[keep], atol=1e-9, rtol=0)
    # a quarter turn about z maps x to y
    q = so3_exp(torch.tensor([0, 0, math.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(q @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-15, rtol=0)


def test_so3_exp_is_differentiable_at_and_away_from_zero():
    for w in (torch.zeros(3, dtype=torch.float64), torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)):
        assert torch.autograd.gradcheck(so3_exp, (w.clone().requires_grad_(),))


def test_apply_pose_is_rigid_about_the_pivot():
    g = circular_orbit([0.2, 1.3], rows=4, cols=5, pixel_size=1.5, sid=300, sdd=500)
    w, t = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64), torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)
    pivot = torch.tensor([10.0, 20.0, -5.0], dtype=torch.float64)
    gp = apply_pose(g, w, t, pivot)
    torch.testing.assert_close((gp.source - gp.center).norm(dim=1), (g.source - g.center).norm(dim=1))
    torch.testing.assert_close(gp.u.norm(dim=1), g.u.norm(dim=1))
    torch.testing.assert_close(gp.source, pose_points(g.source, w, t, pivot))
    # identity pose: same geometry; the pivot of a pure rotation stays put
    torch.testing.assert_close(apply_pose(g).source, g.source)
    torch.testing.assert_close(pose_points(pivot[None], w, torch.zeros(3), pivot)[0], pivot)
    back = pose_points(pose_points(g.center, w, t, pivot), w, t, pivot, inverse=True)
    torch.testing.assert_close(back, g.center)


def test_projection_is_differentiable_with_respect_to_the_pose():
    """d DRR / d (ω, t) through apply_pose and the projector's geometry gradient: gradcheck (trilinear)."""
    vol = torch.rand(6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = circular_orbit([0.4], rows=3, cols=4, pixel_size=1.8, sid=25, sdd=40, isocenter=(2.5, 2.0, 1.5))
    pivot = volume_center(vol.shape)

    def drr(w, t):
        return project(vol, apply_pose(g, w, t, pivot), method="trilinear", step=0.3)

    w = torch.tensor([0.05, -0.02, 0.1], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(drr, (w, t), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_xwin_pose_accepts_tensors_that_require_grad():
    vol = torch.rand(8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    yaw = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    iso = torch.tensor([3.5, 3.5, 3.5], dtype=torch.float64, requires_grad=True)
    g = xwin_pose(yaw, 5.0, -3.0, size=4, pixel_size=3.0, sdd=60, sid=30, isocenter=iso)
    assert g.requires_grad
    out = project(vol, g, method="trilinear", step=0.3)
    gy, gi = torch.autograd.grad(out.sum(), (yaw, iso))
    eps = 1e-5
    fd = (project(vol, xwin_pose(12.0 + eps, 5.0, -3.0, size=4, pixel_size=3.0, sdd=60, sid=30, isocenter=iso.detach()),
                  method="trilinear", step=0.3).sum()
          - project(vol, xwin_pose(12.0 - eps, 5.0, -3.0, size=4, pixel_size=3.0, sdd=60, sid=30,
                                   isocenter=iso.detach()), method="trilinear", step=0.3).sum()) / (2 * eps)
    assert gy.item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)
    assert gi.abs().sum() > 0


def test_pose_metrics():
    a = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, -0.2], dtype=torch.float64)
    assert rotation_distance(a, b).item() == pytest.approx(0.5, abs=1e-12)
    assert rotation_distance(so3_exp(a), so3_exp(a)).item() == pytest.approx(0.0, abs=1e-7)
    assert translation_distance([1.0, 2, 3], [1.0, 2, 7]).item() == pytest.approx(4.0)
    pts = volume_corners((10, 12, 8), np.diag([2.0, 2.0, 3.0, 1.0]))
    assert pts.shape == (8, 3)
    zero = torch.zeros(3, dtype=torch.float64)
    t = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    # a pure translation moves every point by |t|
    assert mtre((zero, t), (zero, zero), pts).item() == pytest.approx(1.0)
    assert mtre((a, t), (a, t), pts).item() == pytest.approx(0.0, abs=1e-12)
    # a rotation about the pivot: points at distance ρ from the axis move 2ρ sin(θ/2)
    c = volume_center((10, 12, 8), np.diag([2.0, 2.0, 3.0, 1.0]))
    p = c + torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)
    assert mtre((a, zero), (zero, zero), p[None], pivot=c).item() == pytest.approx(2 * 5 * math.sin(0.15))


def test_random_pose_respects_its_bounds():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        w, t = random_pose(10.0, 5.0, gen)
        assert w.norm() <= math.radians(10.0) + 1e-12 and t.norm() <= 5.0 + 1e-12


def test_mtre_between_geometries_equals_the_pose_mtre():
    from xwin.pose import mtre_geometries

    g = xwin_pose(20.0, -4.0, 2.0, size=8, pixel_size=3.0, isocenter=(10.0, -5.0, 3.0))
    c = torch.tensor([10.0, -5.0, 3.0], dtype=torch.float64)
    pts = volume_corners((20, 22, 18), np.diag([2.0, 2.0, 2.5, 1.0]))
    w, t = torch.tensor([0.02, -0.05, 0.03], dtype=torch.float64), torch.tensor([2.0, 1.0, -3.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    got = mtre_geometries(apply_pose(g, w, t, c), g, pts)
    assert got.item() == pytest.approx(mtre((w, t), (zero, zero), pts, c).item(), rel=1e-10)
    assert mtre_geometries(g, g, pts).item() == pytest.approx(0.0, abs=1e-9)
