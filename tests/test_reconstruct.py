"""xwin.reconstruct: FDK/FBP against analytic projections, weights, iterative methods on the sample CT, CLI."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from xwin.geometry import Geometry, circular_orbit
from xwin.reconstruct import cgls, fbp, fdk, sirt, tv_recon
from xwin.reconstruct.filters import (FILTERS, ReconstructionError, fit_orbit, fov_mask,
                                      parker_weights, ramp_filter, ramp_response)
from xwin.reconstruct.iterative import divergence, gradient, poisson_noise_norm, tv, tv_prox



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread for this module (restored afterwards): on an oversubscribed CPU, OpenMP workers that
    spin-wait made torch's element-wise ops up to ~40x slower here (CGLS test: 349 s instead of 8 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------- analytic phantoms


def _rays(geom: Geometry):
    """Origins and unit directions (V, rows, cols, 3) of every detector pixel's ray, and the segment length."""
    pix = geom.pixel_positions().numpy()
    if geom.kind == "cone":
        src = geom.source.numpy()[:, None, None, :]
        d = pix - src
        L = np.linalg.norm(d, axis=-1)
        return np.broadcast_to(src, pix.shape), d / L[..., None], L
    d = geom.direction.numpy()
    d = (d / np.linalg.norm(d, axis=1, keepdims=True))[:, None, None, :]
    return pix - 1e4 * d, np.broadcast_to(d, pix.shape), np.full(pix.shape[:3], 2e4)


def ellipsoid_projections(geom, ellipsoids):
    """Exact line integrals of a sum of axis-aligned ellipsoids (centre, semi-axes, μ)."""
    o, d, L = _rays(geom)
    out = np.zeros(L.shape)
    for c, a, mu in ellipsoids:
        oc = (o - np.asarray(c)) / np.asarray(a)
        dd = d / np.asarray(a)
        A = (dd * dd).sum(-1)
        B = 2 * (oc * dd).sum(-1)
        C = (oc * oc).sum(-1) - 1
        disc = B * B - 4 * A * C
        ok = disc > 0
        sq = np.sqrt(np.where(ok, disc, 0))
        t0 = np.clip((-B - sq) / (2 * A), 0, L)
        t1 = np.clip((-B + sq) / (2 * A), 0, L)
        out += mu * np.where(ok, t1 - t0, 0.0)
    return torch.from_numpy(out)


def cylinder_projections(geom, radius, half_height, mu):
    """Exact line integrals of a uniform cylinder about the z axis, |z| ≤ half_height."""
    o, d, L = _rays(geom)
    A = d[..., 0] ** 2 + d[..., 1] ** 2
    B = 2 * (o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1])
    C = o[..., 0] ** 2 + o[..., 1] ** 2 - radius**2
    disc = B * B - 4 * A * C
    ok = (disc > 0) & (A > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0))
    Asafe = np.where(A > 1e-12, A, 1)
    t0, t1 = (-B - sq) / (2 * Asafe), (-B + sq) / (2 * Asafe)
    dz = np.where(np.abs(d[..., 2]) > 1e-12, d[..., 2], 1e-12)
    za, zb = (-half_height - o[..., 2]) / dz, (half_height - o[..., 2]) / dz
    lo = np.maximum.reduce([t0, np.minimum(za, zb), np.zeros_like(t0)])
    hi = np.minimum.reduce([t1, np.maximum(za, zb), L])
    return torch.from_numpy(mu * np.where(ok, np.clip(hi - lo, 0, None), 0.0))


def _grid(shape, spacing):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return aff, np.meshgrid(*axes, indexing="ij")


# ---------------------------------------------------------------------------------------- filters, weights

def test_ramp_response_is_a_ramp_with_windows():
    n = 256
    H = ramp_response(n, "ram-lak")
    f = torch.arange(H.numel(), dtype=torch.float64) / n              # cycles per sample
    # the DFT of the sampled Ram-Lak kernel: ≈ |f| away from DC, small positive DC (no negative offset)
    assert 0 < H[0] < 2.0 / (math.pi**2 * n)
    assert torch.allclose(H[8:], f[8:], atol=2e-3)
    assert abs(float(H[-1]) - 0.5) < 1e-9 + 2.0 / (math.pi**2 * n)
    for w in FILTERS[1:]:
        Hw = ramp_response(n, w)
        assert torch.all(Hw <= H + 1e-12) and float(Hw[-1]) < 0.65 * float(H[-1])   # sinc(π/2) = 0.637
    Hc = ramp_response(n, "ram-lak", cutoff=0.5)
    assert torch.all(Hc[f > 0.25 + 1e-9] == 0) and torch.allclose(Hc[f <= 0.25], H[f <= 0.25])
    with pytest.raises(ReconstructionError, match="filter"):
        ramp_response(n, "butterworth")
    with pytest.raises(ReconstructionError, match="cutoff"):
        ramp_response(n, "hann", cutoff=0)


def test_ramp_filter_zero_padding_has_no_wraparound():
    # a single impulse at the row's end: with padding to ≥ 2n the response does not wrap to the start
    p = torch.zeros(1, 1, 50, dtype=torch.float64)
    p[..., -1] = 1.0
    q = ramp_filter(p)
    k = torch.arange(50, dtype=torch.float64) - 49
    want = torch.where(k == 0, torch.tensor(0.25, dtype=torch.float64),
                       torch.where(k.abs() % 2 == 1, -1 / (math.pi * k) ** 2, torch.zeros_like(k)))
    assert torch.allclose(q[0, 0], want, atol=1e-12)


def test_parker_weights_conjugate_rays_add_to_one():
    span = math.pi + 2 * 0.3
    rng = np.random.default_rng(0)
    gamma = rng.uniform(-0.28, 0.28, 3000)
    beta = rng.uniform(0, span, 3000)
    conj_beta = beta + math.pi + 2 * gamma            # Parker's convention: conjugate = (β + π + 2γ, −γ)
    inside = conj_beta <= span
    w = parker_weights(beta[:, None], gamma[:, None], span)[:, 0]
    wc = parker_weights(conj_beta[:, None], -gamma[:, None], span)[:, 0]
    assert inside.sum() > 100
    np.testing.assert_allclose((w + wc)[inside], 1.0, atol=1e-12)
    # rays measured once (conjugate outside the scan) get weight 1
    alone = (beta + math.pi + 2 * gamma > span) & (beta - math.pi + 2 * gamma < 0)
    np.testing.assert_allclose(w[alone & (beta > 2 * (0.3 - gamma)) & (beta < math.pi - 2 * gamma)], 1.0)


def test_fit_orbit_recovers_circular_scans():
    ang = torch.linspace(0, 1.3 * math.pi, 40, dtype=torch.float64) + 0.4
    g = circular_orbit(ang, rows=4, cols=6, sid=700, sdd=1100, isocenter=(5.0, -3.0, 20.0))
    o = fit_orbit(g)
    assert o.radius == pytest.approx(700, rel=1e-9)
    np.testing.assert_allclose(o.center, [5, -3, 20], atol=1e-6)
    np.testing.assert_allclose(np.diff(o.angles), np.diff(ang.numpy()), atol=1e-9)
    assert not o.full_scan and o.span == pytest.approx(1.3 * math.pi, rel=1e-9)
    assert o.dbeta.sum() == pytest.approx(1.3 * math.pi, rel=1e-9)
    np.testing.assert_allclose(o.axis, [0, 0, 1], atol=1e-9)              # counter-clockwise about +z
    full = fit_orbit(circular_orbit(torch.arange(90) * 2 * math.pi / 90, rows=2, cols=3, kind="parallel"))
    assert full.full_scan and full.dbeta.sum() == pytest.approx(math.pi)      # parallel: lines counted once
    # reversed rotation: angles still increase (the axis flips)
    rev = fit_orbit(circular_orbit(-ang, rows=4, cols=6))
    assert np.all(np.diff(rev.angles) > 0) and rev.axis[2] == pytest.approx(-1.0)
    with pytest.raises(ReconstructionError, match="at least 3 views"):
        fit_orbit(g[[0, 1]])
    line = Geometry.cone([[0, -500.0, z] for z in (0, 10, 20, 30)], [[0, 500.0, z] for z in (0, 10, 20, 30)],
                         [1.0, 0, 0], [0, 0, -1.0], 4, 4)
    with pytest.raises(ReconstructionError, match="line"):
        fit_orbit(line)
    wobble = circular_orbit(ang, rows=4, cols=6, sid=700, sdd=1100)
    wobble = Geometry.cone(wobble.source + torch.randn(40, 3, generator=torch.Generator().manual_seed(0)) * 20,
                           wobble.center, wobble.u, wobble.v, 4, 6)
    with pytest.warns(UserWarning, match="not a circular orbit"):
        fit_orbit(wobble)


# ---------------------------------------------------------------------------------------- FBP / FDK accuracy

def test_parallel_fbp_of_analytic_ellipsoids_matches_mu():
    shape, spacing = (64, 64, 6), (1.5, 1.5, 2.0)
    aff, (X, Y, Z) = _grid(shape, spacing)
    ell = [((0, 0, 0), (40, 30, 60), 0.02), ((-10, 5, 0), (12, 9, 60), -0.006), ((14, -8, 0), (7, 7, 60), 0.01)]
    g = circular_orbit(torch.arange(240) * 2 * math.pi / 240, rows=6, cols=140, pixel_size=(2.0, 0.75),
                       kind="parallel")
    p = ellipsoid_projections(g, ell)
    rec = fbp(p, g, shape, affine=aff).numpy()
    truth = np.zeros(shape)
    safe = np.hypot(X, Y) < 50                             # inside the field of view (detector ±52.5 mm)
    for c, a, mu in ell:
        q = lambda s: ((X - c[0]) / (a[0] + s)) ** 2 + ((Y - c[1]) / (a[1] + s)) ** 2 + ((Z - c[2]) / a[2]) ** 2
        truth += mu * (q(0) <= 1)
        safe &= (q(-5) <= 1) | (q(5) > 1)                 # ≥ 5 mm (over 3 voxels) from every edge
    assert safe.sum() > 0.4 * safe.size
    # point-sampled sharp edges ring (Gibbs) a few voxels into their surroundings: bound the spread of the
    # error relative to the body's μ, and check the mean μ of every region tightly
    err = np.abs(rec - truth)[safe] / 0.02
    assert np.sqrt(np.mean(err**2)) < 0.02 and np.percentile(err, 95) < 0.045 and err.max() < 0.09
    for c, a, mu in ell:
        region = (((X - c[0]) / (a[0] - 5)) ** 2 + ((Y - c[1]) / (a[1] - 5)) ** 2 <= 1) & (truth == truth[
            int(np.argmin(np.abs(X[:, 0, 0] - c[0]))), int(np.argmin(np.abs(Y[0, :, 0] - c[1]))), 0])
        assert rec[region].mean() == pytest.approx(truth[region].mean(), rel=0.005)


@pytest.mark.parametrize("arc", ["full", "short"])
@pytest.mark.parametrize("sid,sdd", [(300.0, 450.0), (600.0, 1100.0)])
def test_fdk_uniform_cylinder_central_slice_within_one_percent(arc, sid, sdd):
    mu, R, H = 0.019, 40.0, 30.0
    shape, spacing = (48, 48, 9), (2.0, 2.0, 2.0)
    aff, (X, Y, Z) = _grid(shape, spacing)
    mag = sdd / sid
    fan = math.atan(50 * 1.2 * mag / sdd)                  # the detector's half fan angle
    if arc == "full":
        ang = torch.arange(180, dtype=torch.float64) * 2 * math.pi / 180
    else:
        ang = torch.linspace(0, math.pi + 2 * fan, 120, dtype=torch.float64)
    g = circular_orbit(ang, rows=40, cols=100, pixel_size=1.2 * mag, sid=sid, sdd=sdd)
    p = cylinder_projections(g, R, H, mu).float()
    rec, info = fdk(p, g, shape, affine=aff, return_info=True)
    assert ("Parker" in info["orbit"]["redundancy"]) == (arc == "short")
    central = rec[:, :, shape[2] // 2].double().numpy()
    r = np.hypot(X[:, :, 0], Y[:, :, 0])
    inside = r < R - 6
    assert central[inside].mean() == pytest.approx(mu, rel=0.01)
    assert np.abs(central[inside] - mu).max() < 0.03 * mu
    ring = (r > R + 6) & (r < 55)                         # outside the cylinder, inside the FOV
    assert np.abs(central[ring]).max() < 0.05 * mu


@pytest.mark.parametrize("arc_deg,views,endpoint", [(180, 90, False), (360, 120, False), (270, 135, True),
                                                    (140, 70, True)])
def test_parallel_fbp_weights_any_arc(arc_deg, views, endpoint):
    """[0°, 180°), a full turn, 270° (lines seen once or twice) all give μ; 140° is limited angle (warned)."""
    mu, R = 0.02, 30.0
    shape, spacing = (40, 40, 3), (2.0, 2.0, 2.0)
    aff, (X, Y, _) = _grid(shape, spacing)
    arc = math.radians(arc_deg)
    ang = torch.linspace(0, arc, views, dtype=torch.float64) if endpoint else \
        torch.arange(views, dtype=torch.float64) * arc / views
    g = circular_orbit(ang, rows=4, cols=90, pixel_size=1.0, kind="parallel")
    p = cylinder_projections(g, R, 100.0, mu)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec, info = fbp(p, g, shape, affine=aff, return_info=True)
    central = rec[:, :, 1].numpy()
    inside = np.hypot(X[:, :, 1], Y[:, :, 1]) < R - 5
    if arc_deg >= 180:
        assert not w and info["orbit"]["full_scan"]
        assert central[inside].mean() == pytest.approx(mu, rel=0.005)
        assert np.abs(central[inside] - mu).max() < 0.02 * mu
    else:
        assert any("limited-angle" in str(x.message) for x in w) and not info["orbit"]["full_scan"]
        assert abs(central[inside].mean() / mu - 1) > 0.01          # the missing wedge shows


def test_fdk_is_linear_batched_and_float64():
    shape, spacing = (16, 16, 5), (3.0, 3.0, 3.0)
    aff, _ = _grid(shape, spacing)
    g = circular_orbit(torch.arange(24) * 2 * math.pi / 24, rows=8, cols=30, pixel_size=3.0, sid=200, sdd=300)
    p1 = cylinder_projections(g, 15, 8, 0.02)
    p2 = ellipsoid_projections(g, [((3, 2, 0), (6, 5, 4), 0.01)])
    r1, r2 = fdk(p1, g, shape, affine=aff), fdk(p2, g, shape, affine=aff)
    assert r1.dtype == torch.float64
    both = fdk(torch.stack([p1, p2]), g, shape, affine=aff)
    assert torch.allclose(both[0], r1, atol=1e-12) and torch.allclose(both[1], r2, atol=1e-12)
    assert torch.allclose(fdk(p1 + 2 * p2, g, shape, affine=aff), r1 + 2 * r2, atol=1e-12)
    assert torch.allclose(fdk(p1.float(), g, shape, affine=aff).double(), r1, atol=1e-6)


def test_fdk_rejects_bad_input():
    g = circular_orbit(torch.arange(8) * 0.7, rows=4, cols=5)
    with pytest.raises(ReconstructionError, match="rows, cols"):
        fdk(torch.zeros(8, 5, 4), g, (4, 4, 4))
    with pytest.raises(ReconstructionError, match="NaN"):
        fdk(torch.full((8, 4, 5), float("nan")), g, (4, 4, 4))
    with pytest.raises(ReconstructionError, match="filter"):
        fdk(torch.zeros(8, 4, 5), g, (4, 4, 4), filter="ramp")
    with pytest.warns(UserWarning, match="shorter than"):
        fdk(torch.zeros(8, 4, 5), circular_orbit(torch.linspace(0, 2.0, 8), rows=4, cols=5), (4, 4, 4))


def test_fov_mask_is_the_cylinder_the_detector_sees():
    shape, spacing = (40, 40, 3), (2.0, 2.0, 2.0)
    aff, (X, Y, _) = _grid(shape, spacing)
    g = circular_orbit(torch.arange(36) * 2 * math.pi / 36, rows=10, cols=31, pixel_size=2.0, kind="parallel")
    m = fov_mask(g, shape, affine=aff).numpy()
    r = np.hypot(X, Y)
    assert m[r < 29].all() and not m[r > 31.5].any()      # half detector width 30 mm


def test_image_metrics_match_scikit_image_and_convert_to_hu():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from xwin.reconstruct.report import image_metrics

    g = torch.Generator().manual_seed(0)
    t = torch.rand(12, 13, 14, generator=g, dtype=torch.float64) * 0.04
    r = t + 0.002 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    dr = float(t.max() - t.min())
    m = image_metrics(r, t, mu_water=0.02)
    assert m["psnr_db"] == pytest.approx(peak_signal_noise_ratio(t.numpy(), r.numpy(), data_range=dr), abs=1e-3)
    assert m["ssim"] == pytest.approx(structural_similarity(t.numpy(), r.numpy(), data_range=dr), abs=1e-4)
    assert m["rmse_hu"] == pytest.approx(float((r - t).pow(2).mean().sqrt()) * 1000 / 0.02, abs=0.01)
    mask = torch.zeros(t.shape, dtype=torch.bool)
    mask[2:8, 3:9, 4:10] = True
    mm = image_metrics(r, t, mask, mu_water=0.02)
    assert mm["fov_voxels"] == 216 and mm["data_range"]["value_mu_per_mm"] <= dr
    with pytest.raises(ValueError, match="empty"):
        image_metrics(r, t, torch.zeros_like(mask))


# ---------------------------------------------------------------------------------------- TV building blocks

def test_gradient_divergence_adjoint_and_tv_prox_matches_skimage():
    from skimage.restoration import denoise_tv_chambolle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, 8, dtype=torch.float64, generator=g)
    z = torch.randn(3, 6, 7, 8, dtype=torch.float64, generator=g)
    w = (1.0, 0.5, 0.8)
    assert float((gradient(x, w) * z).sum()) == pytest.approx(-float((x * divergence(z, w)).sum()), rel=1e-12)
    cube = torch.zeros(16, 16, 16, dtype=torch.float64)
    cube[4:12, 4:12, 4:12] = 1
    noisy = cube + 0.3 * torch.randn(cube.shape, dtype=torch.float64, generator=g)
    theta = 0.2
    obj = lambda u: float(((u - noisy) ** 2).sum() / (2 * theta)) + tv(u)
    mine, _ = tv_prox(noisy, theta, iterations=200, nonneg=False)
    ref = torch.from_numpy(denoise_tv_chambolle(noisy.numpy(), weight=theta, max_num_iter=1000, eps=1e-9))
    assert obj(mine) <= obj(ref) * (1 + 1e-4)
    assert obj(mine) < 0.9 * obj(noisy)
    pos, _ = tv_prox(noisy - 0.5, theta, iterations=50)
    assert float(pos.min()) >= 0


# ---------------------------------------------------------------------------------------- sample CT

@pytest.fixture(scope="module")
def sample_small():
    """The embedded sample CT, 4x block-averaged (32 x 32 x 33 voxels of 11.25 x 11.25 x 10 mm), as μ."""
    from xwin.data import sample_ct
    from xwin.intensity import hu_to_mu
    from xwin.reconstruct.scan import downsample

    v = downsample(sample_ct(), 4)
    return hu_to_mu(v.data), v.affine


def _scan(mu, aff, views, kind="cone"):
    from xwin.kernels import project
    from xwin.reconstruct.scan import scan_geometry

    g, _ = scan_geometry(tuple(mu.shape), aff, kind=kind, sid=1000.0, sdd=1500.0, arc=360.0, views=views)
    return g, project(mu, g, affine=aff)


def _quality(rec, mu):
    from xwin.reconstruct.report import image_metrics

    m = image_metrics(rec, mu)
    return m["psnr_db"], m["ssim"]


# Bounds set from measured runs on this code (2-core CPU, float32), about 1 dB / 0.01 below what was measured;
# see docs/reconstruct.md for the numbers.
BOUNDS = {
    ("fdk", 360): (27.0, 0.93), ("fdk", 60): (26.8, 0.93),
    ("sirt", 180): (34.3, 0.976), ("sirt", 60): (36.1, 0.98),     # 180 views: 6 iterations, 60 views: 10
    ("cgls", 180): (28.0, 0.925), ("cgls", 60): (31.7, 0.959),
    ("tv", 180): (33.9, 0.974), ("tv", 60): (35.8, 0.98),
}


@pytest.mark.parametrize("views", [360, 60])
def test_sample_ct_fdk_reaches_bound(sample_small, views):
    mu, aff = sample_small
    g, p = _scan(mu, aff, views)
    ps, ss = _quality(fdk(p, g, mu.shape, affine=aff), mu)
    lo_p, lo_s = BOUNDS[("fdk", views)]
    assert ps >= lo_p and ss >= lo_s, (ps, ss)


@pytest.mark.parametrize("views", [180, 60])
@pytest.mark.parametrize("method", ["sirt", "cgls", "tv"])
def test_sample_ct_iterative_reaches_bound(sample_small, method, views):
    mu, aff = sample_small
    g, p = _scan(mu, aff, views)
    its = 10 if views <= 60 else 6                      # keep the full-view runs short on a CPU
    if method == "sirt":
        rec, info = sirt(p, g, mu.shape, affine=aff, iterations=its, subsets=10, return_info=True)
    elif method == "cgls":
        rec, info = cgls(p, g, mu.shape, affine=aff, iterations=its, return_info=True)
    else:
        rec, info = tv_recon(p, g, mu.shape, affine=aff, iterations=its, tv_weight=1e-5, return_info=True)
    assert info["iterations"] == its and len(info["residual_history"]) == its
    assert info["residual_history"][-1] < info["residual_history"][0]
    assert float(rec.min()) >= 0
    ps, ss = _quality(rec, mu)
    lo_p, lo_s = BOUNDS[(method, views)]
    assert ps >= lo_p and ss >= lo_s, (ps, ss)


# The same runs (60 views, 10 iterations) on xwin's Joseph operator (what the CLI uses on the CPU) reconstructing
# Siddon-simulated data: no inverse crime, hence lower than the Siddon rows at this coarse grid (measured
# 34.23 / 0.982, 32.16 / 0.965, 34.56 / 0.983 against 37.13, 32.70, 36.82 dB with Siddon; bounds ~1 dB below).
JOSEPH_BOUNDS = {"sirt": (33.2, 0.972), "cgls": (31.1, 0.955), "tv": (33.5, 0.973)}


@pytest.mark.parametrize("method", ["sirt", "cgls", "tv"])
def test_sample_ct_iterative_on_the_joseph_operator_reaches_bound(sample_small, method):
    mu, aff = sample_small
    g, p = _scan(mu, aff, 60)
    fn, kw = {"sirt": (sirt, {"subsets": 10}), "cgls": (cgls, {}), "tv": (tv_recon, {"tv_weight": 1e-5})}[method]
    rec, info = fn(p, g, mu.shape, affine=aff, iterations=10, method="joseph", return_info=True, **kw)
    assert info["projector"] == "joseph" and info["iterations"] == 10
    assert info["projector_calls"]["project"] >= 10 and float(rec.min()) >= 0
    ps, ss = _quality(rec, mu)
    lo_p, lo_s = JOSEPH_BOUNDS[method]
    assert ps >= lo_p and ss >= lo_s, (ps, ss)


def test_os_momentum_speeds_up_consistent_data_and_needs_subsets(sample_small):
    """Nesterov momentum between OS passes: on data the operator explains exactly (Joseph data, Joseph
    operator) 6 passes with momentum beat 6 without (measured 39.41 vs 37.85 dB at ds 4, 60 views, 30 subsets)."""
    from xwin.reconstruct.joseph import JosephProjector
    from xwin.reconstruct.scan import scan_geometry

    mu, aff = sample_small
    g, _ = scan_geometry(tuple(mu.shape), aff, kind="cone", sid=1000.0, sdd=1500.0, arc=360.0, views=60)
    p = JosephProjector(g, mu.shape, affine=aff)(mu.float())
    plain, info0 = sirt(p, g, mu.shape, affine=aff, iterations=6, subsets=30, method="joseph", return_info=True)
    fast, info1 = sirt(p, g, mu.shape, affine=aff, iterations=6, subsets=30, method="joseph", momentum=True,
                       return_info=True)
    assert info1["momentum"] and not info0["momentum"]
    assert info1["projector_calls"] == info0["projector_calls"]          # same cost per pass
    assert float(fast.min()) >= 0
    ps0, ps1 = _quality(plain, mu)[0], _quality(fast, mu)[0]
    assert ps1 > ps0 + 1.0, (ps0, ps1)
    with pytest.raises(ValueError, match="momentum"):
        sirt(p, g, mu.shape, affine=aff, iterations=1, subsets=1, method="joseph", momentum=True)


def test_tv_prox_every_m_subsets_scales_the_weight(sample_small):
    """prox_every=m: one prox per m subset updates (and at the end of each pass) with m times the weight."""
    mu, aff = sample_small
    g, p = _scan(mu, aff, 20)
    calls = []
    import xwin.reconstruct.iterative as it

    orig = it.tv_prox

    def spy(xt, theta, *a, **k):
        calls.append(float(torch.as_tensor(theta).max()))
        return orig(xt, theta, *a, **k)

    it.tv_prox = spy
    try:
        _, info = tv_recon(p, g, mu.shape, affine=aff, iterations=1, subsets=10, prox_every=4, method="joseph",
                           return_info=True)
    finally:
        it.tv_prox = orig
    assert info["prox_every"] == 4 and len(calls) == 3                  # after updates 4, 8 and 10
    assert calls[0] == pytest.approx(2 * calls[2]) and calls[1] == pytest.approx(calls[0])
    with pytest.raises(ValueError, match="prox_every"):
        tv_recon(p, g, mu.shape, affine=aff, iterations=1, prox_every=0)


@pytest.mark.parametrize("method", ["cgls", "tv"])
def test_more_iterations_do_not_make_noise_free_results_worse(sample_small, method):
    mu, aff = sample_small
    g, p = _scan(mu, aff, 60)
    errs = {}

    def cb(k, x):
        errs[k] = float((x - mu).norm())

    if method == "cgls":
        _, info = cgls(p, g, mu.shape, affine=aff, iterations=16, nonneg=False, callback=cb, return_info=True)
        res = info["residual_history"]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(res, res[1:]))   # CGLS: residual never increases
    else:
        tv_recon(p, g, mu.shape, affine=aff, iterations=16, tv_weight=1e-5, callback=cb)
    e = [errs[k] for k in (2, 4, 8, 16)]
    assert all(b <= a * 1.001 for a, b in zip(e, e[1:])), e


def test_noisy_data_discrepancy_principle_stops_cgls_early(sample_small):
    mu, aff = sample_small
    g, p = _scan(mu, aff, 60)
    gen = torch.Generator().manual_seed(0)
    I0 = 2e3
    counts = torch.poisson(I0 * torch.exp(-p.double()), generator=gen).clamp(min=1)
    pn = (-torch.log(counts / I0)).float()
    nn = poisson_noise_norm(pn, I0)
    true_noise = float((pn - p).norm())
    assert nn == pytest.approx(true_noise, rel=0.15)
    _, info = cgls(pn, g, mu.shape, affine=aff, iterations=40, noise_norm=nn, return_info=True)
    assert info["iterations"] < 40 and "discrepancy" in info["stop_reason"]
    assert info["residual_history"][-1] * float(pn.norm()) <= nn


def test_tv_pdhg_option_decreases_objective(sample_small):
    mu, aff = sample_small
    g, p = _scan(mu, aff, 30)
    rec, info = tv_recon(p, g, mu.shape, affine=aff, iterations=8, tv_weight=1e-6, algorithm="pdhg",
                         return_info=True)
    assert info["method"] == "tv-pdhg" and info["residual_history"][-1] < 0.5 * info["residual_history"][0]
    assert float(rec.min()) >= 0
    with pytest.raises(ValueError, match="algorithm"):
        tv_recon(p, g, mu.shape, affine=aff, iterations=1, algorithm="asd-pocs")


def test_iterative_methods_reject_bad_input(sample_small):
    mu, aff = sample_small
    g, p = _scan(mu, aff, 12)
    with pytest.raises(ValueError, match="shape"):
        sirt(p[:-1], g, mu.shape, affine=aff)
    with pytest.raises(ValueError, match="iterations"):
        cgls(p, g, mu.shape, affine=aff, iterations=0)
    with pytest.raises(ValueError, match="subsets"):
        sirt(p, g, mu.shape, affine=aff, subsets=13)
    with pytest.raises(ValueError, match="relaxation"):
        sirt(p, g, mu.shape, affine=aff, relaxation=2.5)
    with pytest.raises(ValueError, match="NaN"):
        tv_recon(p * float("nan"), g, mu.shape, affine=aff)


# ---------------------------------------------------------------------------------------- CLI

def _cli(argv):
    """Run the CLI in-process; returns (status, stdout, stderr)."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from xwin.reconstruct import main

    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:          # argparse
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def test_cli_end_to_end_on_the_sample_writes_all_outputs(tmp_path):
    import nibabel as nib

    out = tmp_path / "run"
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "xwin.reconstruct", "--downsample", "4", "--views", "24",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PSNR" in res.stdout and "outputs" in res.stdout
    mt = json.loads((out / "metrics.json").read_text())
    img = nib.load(str(out / "recon.nii.gz"))
    assert img.shape == (32, 32, 33) == tuple(mt["volume_shape"])
    np.testing.assert_allclose(img.affine, np.array(mt["volume_affine"]), atol=1e-4)
    hu = img.get_fdata()
    assert -1100 < np.median(hu) < 100 and hu.max() > 300        # air and body in HU
    m = mt["metrics"]
    assert m["psnr_db"] > 20 and 0.5 < m["ssim"] <= 1 and m["rmse_hu"] > 0
    assert m["data_range"]["value_mu_per_mm"] > 0 and m["fov_voxels"] == 32 * 32 * 33
    assert {"simulate", "reconstruct", "metrics", "figure"} <= set(mt["time_s"])
    assert mt["memory"]["peak_rss_mib"] > 0
    assert mt["geometry"]["kind"] == "cone" and len(mt["geometry"]["source"]) == 24
    png = (out / "recon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_cli_iterative_method_on_a_nifti_keeps_the_input_affine(tmp_path):
    import nibabel as nib

    from xwin.data import chest_phantom
    from xwin.io import save_volume

    ct = chest_phantom((24, 20, 12), (8.0, 9.0, 10.0), seed=1)
    path = tmp_path / "ct.nii.gz"
    save_volume(ct, path)
    status, out, err = _cli([str(path), "--method", "cgls", "--iterations", "3", "--views", "16",
                             "--downsample", "1", "--geometry", "parallel", "--out", str(tmp_path / "o"), "--quiet"])
    assert status == 0, err
    img = nib.load(str(tmp_path / "o" / "recon.nii.gz"))
    np.testing.assert_allclose(img.affine, nib.load(str(path)).affine, atol=1e-5)
    mt = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert mt["reconstruction"]["iterations"] == 3 and len(mt["reconstruction"]["residual_history"]) == 3
    assert "iterations 3" in out
    # on the CPU the iterative methods reconstruct with the Joseph operator unless told otherwise
    assert mt["recon_projector"] == "joseph" and mt["reconstruction"]["projector"] == "joseph"
    assert "joseph operator" in out
    status, out, err = _cli([str(path), "--method", "sirt", "--iterations", "2", "--views", "16", "--downsample", "1",
                             "--recon-projector", "siddon", "--out", str(tmp_path / "s"), "--quiet"])
    assert status == 0, err
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["reconstruction"]["projector"] == "siddon"
    # fewer views than the default 10 subsets, --subsets not given: one subset per view
    status, out, err = _cli([str(path), "--method", "sirt", "--iterations", "1", "--views", "6", "--downsample", "1",
                             "--out", str(tmp_path / "f"), "--quiet"])
    assert status == 0, err
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["reconstruction"]["subsets"] == 6


def test_cli_short_scan_uses_parker_weights_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the short arc covers the detector's whole fan
        status, out, err = _cli(["--arc", "short", "--views", "40", "--downsample", "4", "--out",
                                 str(tmp_path / "s"), "--quiet"])
    assert status == 0, err
    mt = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert "Parker" in mt["reconstruction"]["orbit"]["redundancy"]
    assert mt["scan"]["arc_deg"] == pytest.approx(180 + 2 * mt["scan"]["fan_half_angle_deg"])
    assert mt["metrics"]["psnr_db"] > 24


@pytest.mark.parametrize("argv,needle", [
    (["--views", "0"], "--views must be positive"),
    (["--method", "art"], "invalid choice"),
    (["--arc", "400"], "--arc must be degrees"),
    (["--detector", "12"], "ROWSxCOLS"),
    (["--sid", "1000", "--sdd", "900"], "--sdd (900 mm) must be larger"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--method", "fdk", "--views", "2"], "at least 3"),
    (["--method", "sirt", "--views", "8", "--subsets", "9"], "cannot exceed"),
    (["--cutoff", "1.5"], "cutoff"),
    (["--noise", "-5"], "--noise must be positive"),
])
def test_cli_rejects_bad_options_with_a_clear_message(argv, needle, tmp_path):
    status, out, err = _cli(argv + ["--out", str(tmp_path / "x"), "--quiet"])
    assert status == 2
    assert needle in err and "Traceback" not in err


def test_cli_rejects_unreadable_files(tmp_path):
    status, _, err = _cli([str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")])
    assert status == 1 and "cannot read CT" in err and "no such file" in err
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a CT volume at all")
    status, _, err = _cli([str(junk), "--out", str(tmp_path / "o")])
    assert status == 1 and "cannot read CT" in err and "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = _cli(["--out", str(blocker / "sub")])
    assert status == 1 and "cannot write" in err
    assert not (tmp_path / "o").exists()          # a failed run leaves no empty output folder behind


@pytest.mark.parametrize("argv", [["--sid", "1000", "--sdd", "900"], ["--downsample", "200"]])
def test_cli_bad_scan_leaves_no_output_folder(tmp_path, argv):
    status, _, err = _cli(argv + ["--out", str(tmp_path / "o"), "--quiet"])
    assert status == 2 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_from_model_dispatches_to_its_module(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("xwin.reconstruct.from_model")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 7
    monkeypatch.setitem(sys.modules, "xwin.reconstruct.from_model", fake)
    status, _, _ = _cli(["--from-model", "ck.pt", "--ct", "x.nii.gz"])
    assert status == 7 and seen["argv"] == ["--from-model", "ck.pt", "--ct", "x.nii.gz"]


def test_cli_from_model_missing_module_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "xwin.reconstruct.from_model", None)     # import fails
    status, out, err = _cli(["--from-model", "ck.pt"])
    assert status == 2 and "--from-model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_help_mentions_from_model():
    status, out, _ = _cli(["--help"])
    assert status == 0 and "--from-model" in out


def test_ssim_in_slabs_equals_the_whole_volume_map():
    """Large volumes get their SSIM map a slab of z at a time (bounded memory): the same map to rounding."""
    from skimage.metrics import structural_similarity

    from xwin.reconstruct.report import _ssim_slabs

    rng = np.random.default_rng(0)
    t = rng.random((20, 18, 30))
    r = t + 0.1 * rng.standard_normal(t.shape)
    full = structural_similarity(t, r, data_range=1.0, win_size=7, full=True)[1]
    for max_voxels in (20 * 18 * 7, 20 * 18 * 2, 10 ** 9):
        parts = list(_ssim_slabs(t, r, 1.0, 7, structural_similarity, max_voxels=max_voxels))
        assert parts[0][0] == 0 and parts[-1][1] == 30
        np.testing.assert_allclose(np.concatenate([s for _, _, s in parts], 2), full, rtol=0, atol=1e-12)
