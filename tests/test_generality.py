"""Adversarial generality checks of the newer fast paths against the slower, trusted ones, on data unlike the
embedded sample: anisotropic / flipped / permuted / oblique affines, odd and non-cubic shapes, short scans,
displaced and non-square detectors, few views, parallel beam, rotation axes along every volume axis.

* FDK: the separable CPU backprojection (kernels/fdk_backproject.py) against the general ``grid_sample`` one
  inside the whole ``fdk`` pipeline, and invariances of the pipeline (a mirrored detector, reversed view
  order, a flipped voxel grid describe the same measurement, so they must give the same volume);
  the FDK filters/weights (xwin/reconstruct/filters.py) against straightforward definitions.
* Joseph (xwin/reconstruct/joseph.py): against a per-ray oracle on axis-aligned, flipped and degenerate set-ups
  and the dot test.
* Geometry-gradient Triton kernels (kernels/geomgrad_triton.py, TRITON_INTERPRET=1) against the torch pass on
  flipped / permuted axis-aligned affines (exact zeros in the ray directions).
* The CLIs end to end on a procedural phantom written with a flipped, anisotropic affine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _helpers import rel_err
from xwin.geometry import Geometry, circular_orbit
from xwin.kernels import fdk_backproject as fbk
from xwin.reconstruct import filters as flt


_THREADS = []


def setup_module():
    """One torch thread (the budget of this file is measured with OMP_NUM_THREADS=1)."""
    _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(_THREADS.pop())


# ---------------------------------------------------------------------------------------- scene builders

_WORLD_PERM = {2: (0, 1, 2), 0: (1, 2, 0), 1: (2, 0, 1)}     # world axes relabelled so the orbit turns about x/y/z


def _rotate_world(g: Geometry, axis: int) -> Geometry:
    """The same scan with world axes cyclically relabelled so the orbit's axis (world z) becomes world ``axis``."""
    P = torch.zeros(3, 3, dtype=torch.float64)
    for src, dst in enumerate(_WORLD_PERM[axis]):
        P[dst, src] = 1.0
    m = lambda x: x @ P.T
    if g.kind == "cone":
        return Geometry.cone(m(g.source), m(g.center), m(g.u), m(g.v), g.rows, g.cols)
    return Geometry.parallel(m(g.direction), m(g.center), m(g.u), m(g.v), g.rows, g.cols)


def _axis_affine(rng, shape, world_axis_of_index, flips):
    """Axis-aligned affine: index axis i runs along world axis ``world_axis_of_index[i]``, anisotropic spacing,
    flipped axes, the grid roughly centred on the isocentre (plus a shift)."""
    A = np.zeros((4, 4))
    sp = rng.uniform(0.6, 1.8, 3)
    for i, wa in enumerate(world_axis_of_index):
        A[wa, i] = sp[i] * (-1.0 if flips[i] else 1.0)
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + rng.uniform(-1.5, 1.5, 3)
    A[3, 3] = 1.0
    return A


def _random_scan(rng, kind, *, short=False, displaced=False):
    views = int(rng.integers(5, 12))
    rows, cols = int(rng.integers(3, 9)), int(rng.integers(4, 13))
    sid = float(rng.uniform(30, 60))
    if short:
        arc = math.pi + float(rng.uniform(0.5, 0.9))
        ang = torch.linspace(0.0, arc, views, dtype=torch.float64) + float(rng.uniform(-3, 3))
    else:
        ang = torch.linspace(0.0, 2 * math.pi, views + 1, dtype=torch.float64)[:-1] + float(rng.uniform(-3, 3))
    if rng.uniform() < 0.5:
        ang = ang.flip(0)                                                  # clockwise orbit
    pw, ph = float(rng.uniform(1.5, 3.0)), float(rng.uniform(1.0, 2.5))
    off_c = float(rng.uniform(0.25, 0.4) * (cols - 1) * pw * rng.choice([-1, 1])) if displaced else float(rng.uniform(-1, 1))
    return circular_orbit(ang, rows=rows, cols=cols, pixel_size=(ph, pw), sid=sid, sdd=1.6 * sid, kind=kind,
                          det_offset=(off_c, float(rng.uniform(-1, 1))))


def _fdk_general(monkeypatch, *args, **kw):
    """``fdk`` with the separable CPU path switched off (the general grid_sample backprojection)."""
    with monkeypatch.context() as m:
        m.setattr(fbk, "separable_axis", lambda *a, **k: None)
        return flt.fdk(*args, **kw)


_CASES = [(kind, short, displaced) for kind in ("cone", "parallel") for short in (False, True)
          for displaced in (False, True) if not (displaced and (short or kind == "parallel"))]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,short,displaced", _CASES)
def test_fdk_separable_equals_general_path_on_unusual_grids(monkeypatch, kind, short, displaced, seed):
    """Whole FDK pipeline: the separable backprojection (dispatched automatically) equals the general one for
    rotation axes along each world axis, permuted / flipped / anisotropic / odd-sized grids."""
    rng = np.random.default_rng(100 * seed + 7 * len(kind) + 3 * short + displaced)
    axis = int(rng.integers(0, 3))
    g = _rotate_world(_random_scan(rng, kind, short=short, displaced=displaced), axis)
    shape = tuple(int(s) for s in rng.integers(2, 8, 3))
    perm = tuple(int(i) for i in rng.permutation(3))
    A = _axis_affine(rng, shape, perm, rng.uniform(size=3) < 0.5)
    p = torch.from_numpy(rng.uniform(-0.2, 1.0, (g.num_views, g.rows, g.cols)))
    M = fbk.view_matrices(g, A)
    # the dispatch must find the index axis that runs along the orbit's axis
    assert fbk.separable_axis(M, shape, g.rows, g.cols) == perm.index(axis) or \
        shape[perm.index(axis)] < max(shape)
    fast = flt.fdk(p, g, shape, affine=A)
    ref = _fdk_general(monkeypatch, p, g, shape, affine=A)
    assert ref.abs().max() > 0
    assert rel_err(fast, ref) < 1e-11, rel_err(fast, ref)
    f32 = flt.fdk(p.float(), g, shape, affine=A)
    assert f32.dtype == torch.float32 and rel_err(f32, ref) < 1e-4


def _flip_u(g: Geometry) -> Geometry:
    first = g.source if g.kind == "cone" else g.direction
    return getattr(Geometry, g.kind)(first, g.center, -g.u, g.v, g.rows, g.cols)


def _flip_v(g: Geometry) -> Geometry:
    first = g.source if g.kind == "cone" else g.direction
    return getattr(Geometry, g.kind)(first, g.center, g.u, -g.v, g.rows, g.cols)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind,short,displaced", _CASES)
def test_fdk_is_invariant_to_how_the_same_measurement_is_described(kind, short, displaced, seed):
    """A mirrored column axis (u → −u with the columns reversed), a mirrored row axis, the views listed in
    reverse order and a flipped voxel grid are the same scan of the same object: FDK must not change."""
    rng = np.random.default_rng(1000 + 10 * seed + 5 * short + 2 * displaced + len(kind))
    g = _random_scan(rng, kind, short=short, displaced=displaced)
    shape = tuple(int(s) for s in rng.integers(3, 8, 3))
    A = _axis_affine(rng, shape, (0, 1, 2), (False, False, False))
    p = torch.from_numpy(rng.uniform(-0.2, 1.0, (g.num_views, g.rows, g.cols)))
    ref = flt.fdk(p, g, shape, affine=A)
    assert ref.abs().max() > 0
    same = {
        "mirrored columns": flt.fdk(p.flip(-1), _flip_u(g), shape, affine=A),
        "mirrored rows": flt.fdk(p.flip(-2), _flip_v(g), shape, affine=A),
        "reversed views": flt.fdk(p.flip(0), g[torch.arange(g.num_views - 1, -1, -1)], shape, affine=A),
    }
    F = np.diag([-1.0, 1.0, -1.0, 1.0])
    F[0, 3], F[2, 3] = shape[0] - 1, shape[2] - 1
    same["flipped grid"] = flt.fdk(p, g, shape, affine=A @ F).flip(0).flip(2)
    same["one of a batch"] = flt.fdk(torch.stack([p.flip(0), p]), g, shape, affine=A)[1]
    for name, got in same.items():
        assert rel_err(got, ref) < 1e-10, (name, rel_err(got, ref))
    assert torch.equal(flt.fov_mask(_flip_u(g), shape, affine=A), flt.fov_mask(g, shape, affine=A))


# ---------------------------------------------------------------------------------------- FDK filters / weights

def test_next_smooth_is_the_smallest_5_smooth_number():
    def smooth(m):
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        return m == 1
    for n in range(1, 3000):
        m = flt._next_smooth(n)
        assert m >= n and smooth(m), n
        assert not any(smooth(k) for k in range(n, m)), n


@pytest.mark.parametrize("window,cutoff", [("ram-lak", 1.0), ("ram-lak", 0.6), ("hann", 1.0)])
@pytest.mark.parametrize("n", [1, 2, 5, 17, 33, 100])
def test_ramp_filter_equals_a_direct_linear_convolution(n, window, cutoff):
    """Ram-Lak (any padding ≥ 2n): the linear convolution with the sampled kernel h[0]=1/4, h[odd k]=−1/(πk)²;
    windowed filters: the circular convolution at the documented power-of-two length, cropped."""
    rng = np.random.default_rng(n)
    p = torch.from_numpy(rng.normal(size=(2, 3, n)))
    got = flt.ramp_filter(p, window, cutoff)
    if window == "ram-lak" and cutoff == 1.0:
        k = np.arange(-(n - 1), n)
        h = np.where(k == 0, 0.25, np.where(k % 2 != 0, -1.0 / (np.pi * np.where(k == 0, 1, k)) ** 2, 0.0))
        want = np.stack([[np.convolve(row, h)[n - 1:2 * n - 1] for row in blk] for blk in p.numpy()])
    else:
        n_pad = max(64, 1 << (2 * n - 1).bit_length())
        h = np.fft.irfft(flt.ramp_response(n_pad, window, cutoff).numpy(), n=n_pad)
        x = np.zeros(p.shape[:-1] + (n_pad,))
        x[..., :n] = p.numpy()
        want = np.fft.irfft(np.fft.rfft(x) * np.fft.rfft(h), n=n_pad)[..., :n]
    assert np.allclose(got.numpy(), want, atol=1e-12 * max(1.0, np.abs(want).max()))


def _tilted(g: Geometry, angle: float) -> Geometry:
    """The detector turned in its plane by ``angle`` (u, v rotated together): not separable any more."""
    c, s = math.cos(angle), math.sin(angle)
    return Geometry.cone(g.source, g.center, c * g.u + s * g.v, -s * g.u + c * g.v, g.rows, g.cols)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(3))
def test_fdk_weights_equal_their_definition(seed):
    """Cosine pre-weights = SDD / |pixel − source| from the pixel positions, the scale = Δβ·D·SDD/du, and the
    blocked computation inside fdk() equals fdk_weights' whole-scan array (non-square, offset, tilted detector)."""
    rng = np.random.default_rng(seed)
    g = _random_scan(rng, "cone", short=bool(seed % 2))
    if seed == 2:
        g = _tilted(g, 0.2)
    pre, scale, _ = flt.fdk_weights(g)
    o = flt.fit_orbit(g)
    cosine, red, scale2, _ = flt._fdk_factors(g)
    S = g.source[:, None, None, :]
    pix = g.pixel_positions()
    n = torch.linalg.cross(g.u, g.v)
    n = n / n.norm(dim=1, keepdim=True)
    sdd = ((g.center - g.source) * n).sum(1).abs()
    cos = sdd[:, None, None] / (pix - S).norm(dim=-1)
    assert torch.allclose(torch.from_numpy(cosine(slice(None))), cos, rtol=1e-12, atol=0)
    for sl in (slice(0, 2), slice(3, None), slice(1, 4)):
        assert np.allclose(cosine(sl), cos[sl].numpy(), rtol=1e-12, atol=0)
    assert torch.allclose(pre, cos * torch.from_numpy(red)[:, None, :], rtol=1e-12, atol=0)
    want = o.dbeta * o.radius * sdd.numpy() / g.u.norm(dim=1).numpy()
    assert np.allclose(scale.numpy(), want, rtol=1e-12) and np.allclose(scale2, want, rtol=1e-12)
    assert abs(o.dbeta.sum() - o.span) < 1e-9 * o.span


# ---------------------------------------------------------------------------------------- Joseph projector

def _joseph_oracle(vol: np.ndarray, g: Geometry, a: np.ndarray) -> np.ndarray:
    """Joseph from its definition, vectorised over (ray, plane) in numpy float64: planes of the main index axis,
    zero-padded bilinear interpolation inside each plane, times the world length of one plane step."""
    N = np.array(vol.shape)
    minv = np.linalg.inv(a)
    pix = g.pixel_positions().numpy().reshape(-1, 3) @ minv[:3, :3].T + minv[:3, 3]
    per_view = g.rows * g.cols
    if g.is_cone:
        o = np.repeat(g.source.numpy() @ minv[:3, :3].T + minv[:3, 3], per_view, 0)
        d = pix - o
    else:
        o, d = pix, np.repeat(g.direction.numpy() @ minv[:3, :3].T, per_view, 0)
    out = np.zeros(len(o))
    pad = np.pad(vol, 1)                                                   # zero border: taps outside read 0
    for r in range(len(o)):
        ax = int(np.argmax(np.abs(d[r])))
        pl = np.arange(N[ax], dtype=np.float64)
        tau = (pl - o[r, ax]) / d[r, ax]
        keep = (tau >= 0) & (tau <= 1) if g.is_cone else np.ones_like(tau, dtype=bool)
        pts = o[r] + tau[keep, None] * d[r]
        pts[:, ax] = pl[keep]
        f = np.floor(pts)
        t = pts - f
        total = 0.0
        for corner in range(4):
            idx, w = f.copy(), np.ones(len(pts))
            for bit, b in enumerate(x for x in range(3) if x != ax):
                hi = (corner >> bit) & 1
                idx[:, b] += hi
                w *= t[:, b] if hi else 1 - t[:, b]
            ii = np.clip(idx.astype(np.int64) + 1, 0, N + 1)                 # into the padded array
            inside = np.all((idx >= -1) & (idx <= N), 1)
            total += float((w * inside * pad[ii[:, 0], ii[:, 1], ii[:, 2]]).sum())
        out[r] = total * np.linalg.norm(a[:3, :3] @ d[r]) / abs(d[r, ax])
    return out.reshape(g.num_views, g.rows, g.cols)


def _joseph_scenes():
    """(name, shape, affine, geometry): axis-aligned rays on flipped / permuted anisotropic grids (in-plane
    slopes exactly 0, rays on voxel-centre planes), a one-voxel-thick volume, parallel beam along an index
    axis, a source inside the volume, a non-square tilted detector, rays tied between two main axes."""
    rng = np.random.default_rng(5)
    out = []
    shape = (5, 4, 3)
    A = _axis_affine(rng, shape, (1, 2, 0), (True, False, True))
    quarter = torch.tensor([0.0, math.pi / 2, math.pi, 1.5 * math.pi], dtype=torch.float64)
    out.append(("cone, axis-aligned views, permuted flipped grid", shape, A,
                circular_orbit(quarter, rows=3, cols=6, pixel_size=(1.1, 0.7), sid=20, sdd=35)))
    out.append(("parallel along index axes", shape, A,
                circular_orbit(quarter, rows=4, cols=5, pixel_size=(0.9, 1.3), kind="parallel",
                               det_offset=(0.35, 0.0))))
    thin = (6, 1, 5)
    At = _axis_affine(rng, thin, (0, 1, 2), (False, True, False))
    out.append(("one-voxel-thick volume", thin, At,
                circular_orbit(torch.tensor([0.3, 1.2, 2.9]), rows=3, cols=7, pixel_size=0.8, sid=15, sdd=30)))
    inside = Geometry.cone(torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.0, 0.0]]),
                           torch.tensor([[9.0, 2.0, -1.0], [-1.0, 8.0, 3.0]]),
                           torch.tensor([[0.0, 1.1, 0.2], [1.0, 0.0, 0.0]]),
                           torch.tensor([[0.1, 0.0, 0.9], [0.0, 0.3, -1.0]]), 4, 9)
    out.append(("source inside, tilted non-square detector", (6, 5, 4), _axis_affine(rng, (6, 5, 4), (2, 0, 1),
                                                                                     (False, True, True)), inside))
    diag = Geometry.parallel(torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 1.0]]), torch.zeros(2, 3),
                             torch.tensor([[0.7, -0.7, 0.0], [1.0, 0.0, 0.0]]),
                             torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.6, 0.6]]), 3, 5)
    out.append(("main-axis ties", (4, 4, 4), np.diag([1.0, 1.0, 1.0, 1.0]) + np.pad(np.full((3, 1), -1.5), ((0, 1), (3, 0))),
                diag))
    return out


@pytest.mark.parametrize("case", range(5))
def test_joseph_on_degenerate_and_axis_aligned_setups(case):
    from xwin.reconstruct.joseph import JosephProjector

    name, shape, A, g = _joseph_scenes()[case]
    rng = np.random.default_rng(case)
    vol = rng.uniform(0.1, 1.0, shape)
    want = _joseph_oracle(vol, g, A)
    assert np.abs(want).max() > 0, name
    for bins in (1, 3):
        P = JosephProjector(g, shape, affine=A, dtype=torch.float64, plane_bins=bins, chunk_bytes=4096)
        got = P(torch.from_numpy(vol)).numpy()
        assert np.allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max()), (name, bins, np.abs(got - want).max())
        y = torch.from_numpy(rng.normal(size=P.out_shape))
        x = torch.from_numpy(vol)
        lhs, rhs = float((P(x) * y).sum()), float((x * P.T(y)).sum())
        assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs) + 1), (name, lhs, rhs)


def test_joseph_and_a_fine_trilinear_projector_agree_on_a_smooth_object():
    """Units under an oblique anisotropic, flipped affine: on a smooth blob Joseph's plane sums and the trilinear
    midpoint rule at a fine step both approximate the same line integrals."""
    from xwin.kernels import project
    from xwin.reconstruct.joseph import JosephProjector

    rng = np.random.default_rng(11)
    shape = (14, 11, 9)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    A = np.eye(4)
    A[:3, :3] = q @ np.diag([1.4, -0.8, 2.1])
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world = idx @ A[:3, :3].T + A[:3, 3]
    vol = torch.from_numpy(np.exp(-(world ** 2).sum(-1) / (2 * 4.5 ** 2)))
    for kind in ("cone", "parallel"):
        g = circular_orbit(torch.linspace(0.1, 3.0, 5, dtype=torch.float64), rows=7, cols=9, pixel_size=(2.3, 1.7),
                           sid=60, sdd=90, kind=kind, det_offset=(0.6, -0.4))
        jo = JosephProjector(g, shape, affine=A, dtype=torch.float64)(vol)
        tri = project(vol, g, affine=torch.from_numpy(A), method="trilinear", step=0.05)
        assert tri.abs().max() > 1.0
        assert rel_err(jo, tri) < 0.02, (kind, rel_err(jo, tri))


# ---------------------------------------------------------------------------------------- registration, parallel beam

def _parallel_registration_case(init_angles):
    from xwin.geometry import euler_zxy
    from xwin.intensity import hu_to_mu
    from xwin.kernels import project
    from xwin.phantom import chest_phantom

    v = chest_phantom((24, 20, 16), (8.0, 9.0, 12.0), seed=1)
    mu, A = hu_to_mu(v.data.double()).float(), np.asarray(v.affine)

    def view(angles):
        R = euler_zxy(*angles).reshape(3, 3)
        vec = lambda *x: R @ torch.tensor(x, dtype=torch.float64)
        return Geometry.parallel(vec(0.0, 1.0, 0.0), vec(0.0, 150.0, 0.0), vec(-6.0, 0.0, 0.0), vec(0.0, 0.0, -6.0), 30, 44)

    truth = view((6.0, -3.0, 2.0))
    target = project(mu, truth, affine=torch.from_numpy(A), method="siddon")[0]
    return mu, A, target, view(init_angles), truth


def test_register_with_lm_requested_recovers_a_near_axis_parallel_beam_pose():
    """A beam 1-3 deg off a voxel axis (rays cross < 1 voxel plane sideways): LM's exact Siddon Jacobian predicts
    only sub-voxel moves there (it stopped 5.9 deg off), so ``register`` runs Adam, which measured 0.011 x err0."""
    from xwin.register.core import register

    mu, A, target, init, truth = _parallel_registration_case((1.3, 2.1, -0.7))
    err0 = float((init.direction - truth.direction).norm())
    r = register(mu, target, init, affine=A, optimizer="lm")
    err = float((r.geometry.direction - truth.direction).norm())
    assert r.optimizer == "adam" and r.converged, (r.optimizer, r.status)
    assert err < 0.1 * err0, (err0, err)


def test_near_axis_parallel_beam_detection():
    from xwin.geometry import euler_zxy
    from xwin.register.core import near_axis_parallel_beam

    A = np.diag([8.0, 9.0, 12.0, 1.0])
    shape = (24, 20, 16)

    def beam(*angles):
        R = euler_zxy(*angles).reshape(3, 3)
        vec = lambda *x: R @ torch.tensor(x, dtype=torch.float64)
        return Geometry.parallel(vec(0.0, 1.0, 0.0), vec(0.0, 150.0, 0.0), vec(-6.0, 0.0, 0.0), vec(0.0, 0.0, -6.0), 4, 4)

    assert near_axis_parallel_beam(beam(0.0, 0.0, 0.0), A, shape)
    assert near_axis_parallel_beam(beam(1.3, 2.1, -0.7), A, shape)
    assert near_axis_parallel_beam(beam(30.0, 0.0, 0.0), A, shape)        # still along voxel planes of z
    assert not near_axis_parallel_beam(beam(30.0, 25.0, 0.0), A, shape)
    g = beam(30.0, 25.0, 0.0)
    assert not near_axis_parallel_beam(Geometry.cone(g.center - 500 * g.direction, g.center, g.u, g.v, 4, 4), A, shape)


@pytest.mark.parametrize("optimizer", ["adam", "lm"])
def test_register_from_an_axis_aligned_parallel_beam_start(optimizer):
    from xwin.register.core import register

    mu, A, target, init, truth = _parallel_registration_case((0.0, 0.0, 0.0))
    err0 = float((init.direction - truth.direction).norm())
    r = register(mu, target, init, affine=A, optimizer=optimizer)
    err = float((r.geometry.direction - truth.direction).norm())
    # every ray runs along voxel columns: Siddon's pose gradient is 0 (its integral is piecewise constant in the
    # pose), so the run detects that and is redone with Adam on the trilinear projector (measured: 0.22 x err0)
    assert (r.optimizer, r.method) == ("adam", "trilinear") and r.converged, (r.optimizer, r.method, r.status)
    assert err < 0.3 * err0, (err0, err)


def test_register_adam_recovers_a_parallel_beam_pose_from_an_oblique_start():
    """The same scene from an oblique start registers with Adam."""
    from xwin.register.core import register

    mu, A, target, init, truth = _parallel_registration_case((1.3, 2.1, -0.7))
    err0 = float((init.direction - truth.direction).norm())
    r = register(mu, target, init, affine=A, optimizer="adam")
    assert float((r.geometry.direction - truth.direction).norm()) < 0.1 * err0


# ---------------------------------------------------------------------------------------- geometry-gradient kernels

def _geomgrad_scene(kind, seed):
    """Axis-aligned rays (views at multiples of 90 deg plus one oblique view) through a flipped, permuted,
    anisotropic grid, batched with an oblique copy; non-square detector, offset so some rays graze faces."""
    from xwin.kernels._prep import affine_batch, min_spacing, ray_params

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(2, 6, 3))
    A0 = _axis_affine(rng, shape, tuple(int(i) for i in rng.permutation(3)), rng.uniform(size=3) < 0.5)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    A1 = A0.copy()
    A1[:3, :3] = q @ A0[:3, :3]                                            # the same grid turned obliquely
    ang = torch.tensor([0.0, math.pi / 2, math.pi, 0.7], dtype=torch.float64)
    g = circular_orbit(ang, rows=3, cols=4, pixel_size=(1.0, 0.9), sid=12.0, sdd=20.0, kind=kind,
                       det_offset=(0.5, 0.25))
    aff = affine_batch(np.stack([A0, A1]))
    gen = torch.Generator().manual_seed(seed)
    vol = torch.rand((2,) + shape, generator=gen, dtype=torch.float64) + 0.3
    w = torch.rand(2, g.num_views, g.rows, g.cols, generator=gen, dtype=torch.float64) - 0.4
    return vol, w, ray_params(g, aff), 0.55 * min_spacing(aff)


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_geomgrad_kernel_equals_reference_on_flipped_axis_aligned_grids(kind, method):
    from xwin.kernels import geomgrad, triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("Triton cannot run here (no CUDA, no interpreter)")
    for seed in range(2 if method == "siddon" else 1):          # the interpreter is slow: ~3 s per trilinear pass
        vol, w, prm, dts = _geomgrad_scene(kind, seed)
        gp_ref, gdt_ref = geomgrad.params_grad_reference(vol, w, prm, dts, kind, method)
        gp, gdt = geomgrad.params_grad_triton(vol, w, prm, dts, kind, method)
        assert torch.isfinite(gp_ref).all() and gp_ref.abs().max() > 0
        assert rel_err(gp, gp_ref) <= 1e-10, (seed, rel_err(gp, gp_ref))
        assert rel_err(gdt, gdt_ref) <= 1e-10
        if seed:
            continue
        gp32, _ = geomgrad.params_grad_triton(vol.float(), w.float(), prm, dts, kind, method)
        gp32_ref, _ = geomgrad.params_grad_reference(vol.float(), w.float(), prm, dts, kind, method)
        assert rel_err(gp32, gp32_ref) <= 1e-5


def _separable_random_views(rng, kind, views):
    """Views that are separable about world z without being a circular orbit: per view a random source height
    and distance (or an oblique parallel direction), a detector turned about z at a random distance and height,
    columns ``u`` with a z component (skewed detector), rows ``v`` along ±z of random pitch."""
    first, cen, us, vs = [], [], [], []
    for _ in range(views):
        th = rng.uniform(0, 2 * math.pi)
        radial = np.array([math.cos(th), math.sin(th), 0.0])
        tang = np.array([-math.sin(th), math.cos(th), 0.0])
        if kind == "cone":
            first.append(rng.uniform(15, 40) * radial + np.array([0, 0, rng.uniform(-6, 6)]) + rng.normal(size=3) * [1, 1, 0])
        else:
            first.append(-radial + np.array([0.0, 0.0, rng.uniform(-0.6, 0.6)]))
        cen.append(-rng.uniform(8, 20) * radial + rng.uniform(-2, 2, 3))
        us.append(tang * rng.uniform(1.0, 2.5) + np.array([0.0, 0.0, rng.uniform(-0.8, 0.8)]))
        vs.append(np.array([0.0, 0.0, rng.choice([-1, 1]) * rng.uniform(0.8, 2.0)]))
    t = lambda x: torch.tensor(np.array(x))
    return getattr(Geometry, kind)(t(first), t(cen), t(us), t(vs), int(rng.integers(1, 7)), int(rng.integers(1, 9)))


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_separable_path_on_irregular_separable_views(kind):
    """backproject_separable = backproject_reference for separable views that are no orbit at all (skewed
    detectors, per-view distances and heights, oblique parallel directions), odd shapes incl. size-1 axes,
    batched, flipped / permuted grids, small working budgets (many blocks)."""
    rng = np.random.default_rng(42 + len(kind))
    for trial in range(6):
        g = _separable_random_views(rng, kind, int(rng.integers(1, 7)))
        shape = tuple(int(s) for s in rng.integers(1, 7, 3))
        perm = tuple(int(i) for i in rng.permutation(3))
        A = _axis_affine(rng, shape, perm, rng.uniform(size=3) < 0.5)
        M = fbk.view_matrices(g, A)
        axis = fbk.separable_axis(M, shape, g.rows, g.cols)
        assert axis is not None
        q = torch.from_numpy(rng.uniform(-0.5, 1.0, (2, g.num_views, g.rows, g.cols)))
        for dw in (True, False):
            ref = fbk.backproject_reference(q, M, shape, distance_weight=dw)
            for budget in (1 << 21, 50):
                got = fbk.backproject_separable(q, M, shape, axis=axis, distance_weight=dw, budget=budget)
                assert rel_err(got, ref) < 1e-12, (trial, dw, budget, rel_err(got, ref))
            assert torch.equal(fbk.fdk_backproject(q, M, shape, distance_weight=dw, backend="torch"),
                               fbk.backproject_separable(q, M, shape, axis=axis, distance_weight=dw))


# ---------------------------------------------------------------------------------------- CLIs end to end

def _run_cli(*args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(res):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[-1].lower(), res.stderr


@pytest.fixture(scope="module")
def flipped_phantom(tmp_path_factory):
    """A procedural chest phantom (non-cubic, anisotropic) written twice: as made (RAS) and with index axes 0 and
    2 reversed (an LPS-like, flipped affine describing the same world)."""
    from xwin.io.nifti import save_volume
    from xwin.io.volume import Volume
    from xwin.phantom import chest_phantom

    d = tmp_path_factory.mktemp("phantom")
    v = chest_phantom((30, 26, 17), (6.5, 7.5, 11.0), seed=3)
    data = v.data.float()
    F = np.diag([-1.0, 1.0, -1.0, 1.0])
    F[0, 3], F[2, 3] = data.shape[0] - 1, data.shape[2] - 1
    save_volume(Volume(data, np.asarray(v.affine)), d / "ras.nii.gz")
    save_volume(Volume(data.flip(0).flip(2).contiguous(), np.asarray(v.affine) @ F), d / "flip.nii.gz")
    return d, v


def test_cli_reconstruct_of_a_flipped_ct_is_the_flipped_reconstruction(flipped_phantom):
    import json

    import nibabel as nib

    d, _ = flipped_phantom
    out = {}
    for name in ("ras", "flip"):
        res = _run_cli("xwin.reconstruct", f"{name}.nii.gz", "--views", 48, "--downsample", 1, "--quiet",
                       "--out", f"rec_{name}", cwd=d)
        assert res.returncode == 0, res.stderr[-2000:]
        img = nib.load(d / f"rec_{name}" / "recon.nii.gz")
        out[name] = (np.asarray(img.get_fdata()), img.affine,
                     json.loads((d / f"rec_{name}" / "metrics.json").read_text())["metrics"])
    ras, flip = out["ras"], out["flip"]
    assert np.allclose(flip[1], nib.load(d / "flip.nii.gz").affine)
    assert np.abs(flip[0][::-1, :, ::-1] - ras[0]).max() <= 1e-3 * np.abs(ras[0]).max()
    assert ras[2]["psnr_db"] > 20 and abs(flip[2]["psnr_db"] - ras[2]["psnr_db"]) < 0.05


def _orbit_about_y(centre, angles, rows, cols):
    """A cone-beam orbit about world y (not the scanner's z) through ``centre``, detector offset, non-square."""
    g = circular_orbit(angles, rows=rows, cols=cols, pixel_size=(8.0, 5.0), sid=500, sdd=800, det_offset=(6.0, -3.0))
    P = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    c = torch.as_tensor(centre, dtype=torch.float64)
    return Geometry.cone(g.source @ P.T + c, g.center @ P.T + c, g.u @ P.T, g.v @ P.T, rows, cols)


def test_cli_reconstruct_given_projections_and_a_json_short_scan(flipped_phantom):
    import nibabel as nib

    from xwin.intensity import hu_to_mu
    from xwin.io.load import load_volume
    from xwin.kernels import project

    d, _ = flipped_phantom
    v = load_volume(d / "flip.nii.gz")
    A = torch.from_numpy(np.asarray(v.affine))
    mu = hu_to_mu(v.data.double())
    centre = A[:3, :3] @ ((torch.tensor(v.data.shape, dtype=torch.float64) - 1) / 2) + A[:3, 3]
    g = _orbit_about_y(centre, torch.linspace(0.3, 0.3 + math.pi + 0.7, 72, dtype=torch.float64), 30, 70)
    np.save(d / "proj.npy", project(mu, g, affine=A).numpy().astype(np.float32))
    (d / "geom.json").write_text(g.to_json())
    res = _run_cli("xwin.reconstruct", "--projections", "proj.npy", "--geometry", "geom.json", "--like", "flip.nii.gz",
                   "--values", "mu", "--quiet", "--out", "rec_proj", cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = np.asarray(nib.load(d / "rec_proj" / "recon.nii.gz").get_fdata())
    truth = mu.numpy()
    core = (slice(6, -6), slice(6, -6), slice(3, -3))
    assert np.corrcoef(rec[core].ravel(), truth[core].ravel())[0, 1] > 0.9
    assert abs(rec[core].mean() / truth[core].mean() - 1) < 0.1
    np.save(d / "proj_t.npy", np.load(d / "proj.npy").transpose(0, 2, 1).copy())
    _assert_one_line_error(_run_cli("xwin.reconstruct", "--projections", "proj_t.npy", "--geometry", "geom.json",
                                    "--like", "flip.nii.gz", "--out", "rec_bad", cwd=d))


def test_cli_register_with_a_non_square_detector(flipped_phantom):
    """40x72 detector, 8.7 deg initial error, the RAS copy (the flipped copy of the same CT does not register:
    see test_register_does_not_depend_on_how_the_ct_is_stored)."""
    from xwin.geometry import xwin_pose
    from xwin.intensity import hu_to_mu
    from xwin.io.load import load_volume
    from xwin.kernels import project

    d, _ = flipped_phantom
    v = load_volume(d / "ras.nii.gz")
    A = torch.from_numpy(np.asarray(v.affine))
    centre = (A[:3, :3] @ ((torch.tensor(v.data.shape, dtype=torch.float64) - 1) / 2) + A[:3, 3]).tolist()

    def pose(*angles):
        g = xwin_pose(*angles, size=64, isocenter=centre)
        return Geometry.cone(g.source, g.center, g.u * 1.3, g.v * 1.3, 40, 72)

    truth, init = pose(7.0, -4.0, 3.0), pose(0.0, 0.0, 0.0)
    np.save(d / "target.npy", project(hu_to_mu(v.data.double()), truth, affine=A)[0].numpy().astype(np.float32))
    (d / "init.json").write_text(init.to_json())
    res = _run_cli("xwin.register", "ras.nii.gz", "--xray", "target.npy", "--init", "init.json", "--out", "reg",
                   "--no-progress", "--no-figures", cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    got = Geometry.from_json(d / "reg" / "geometry.json")
    assert (got.rows, got.cols) == (40, 72)
    assert float((got.source - truth.source).norm()) < 1.0 and float((got.center - truth.center).norm()) < 1.0
    np.save(d / "target_t.npy", np.load(d / "target.npy").T.copy())
    _assert_one_line_error(_run_cli("xwin.register", "ras.nii.gz", "--xray", "target_t.npy", "--init", "init.json",
                                    "--out", "reg_bad", "--no-progress", "--no-figures", cwd=d))


def _coarse_phantom_scene(seed):
    """A coarse chest phantom (30x26x17 voxels of 6.5x7.5x11 mm), a 40x72 cone detector posed about its centre
    (``pose(*angles)``), the true pose xwin_pose(7, -4, 3) and its noise-free target: (mu, A, pose, truth, target)."""
    from xwin.geometry import xwin_pose
    from xwin.intensity import hu_to_mu
    from xwin.kernels import project
    from xwin.phantom import chest_phantom

    v = chest_phantom((30, 26, 17), (6.5, 7.5, 11.0), seed=seed)
    A = np.asarray(v.affine)
    mu = hu_to_mu(v.data.double())
    centre = (A[:3, :3] @ ((np.array(mu.shape) - 1) / 2) + A[:3, 3]).tolist()

    def pose(*angles):
        g = xwin_pose(*angles, size=64, isocenter=centre)
        return Geometry.cone(g.source, g.center, g.u * 1.3, g.v * 1.3, 40, 72)

    truth = pose(7.0, -4.0, 3.0)
    return mu, A, pose, truth, project(mu, truth, affine=torch.from_numpy(A))[0]


@pytest.mark.parametrize("optimizer", [
    "lm",
    pytest.param("adam", marks=pytest.mark.xfail(strict=True, reason=(
        "Adam (not the default) stops in a wrong pose ~9 deg from the truth on a coarse chest phantom (30x26x17 voxels "
        "of 6.5x7.5x11 mm, seed 4) from an 8.7 deg start on a noise-free DRR target; the default LM recovers it"))),
])
def test_register_recovers_a_9_degree_pose_on_a_coarse_phantom(optimizer):
    from xwin.register.core import register

    mu, A, pose, truth, target = _coarse_phantom_scene(seed=4)
    r = register(mu.float(), target, pose(0.0, 0.0, 0.0), affine=A, optimizer=optimizer)
    assert float((r.geometry.source - truth.source).norm()) < 5.0


def test_register_does_not_depend_on_how_the_ct_is_stored():
    from xwin.register.core import register

    mu, A, pose, truth, target = _coarse_phantom_scene(seed=3)
    F = np.diag([-1.0, 1.0, -1.0, 1.0])
    F[0, 3], F[2, 3] = mu.shape[0] - 1, mu.shape[2] - 1
    src = [register(vol.float(), target, pose(0.0, 0.0, 0.0), affine=aff, optimizer="lm").geometry.source
           for vol, aff in ((mu, A), (mu.flip(0).flip(2), A @ F))]
    assert float((src[0] - truth.source).norm()) < 1.0                  # the RAS copy registers
    assert float((src[1] - src[0]).norm()) < 1.0


def test_cli_iterative_reconstruction_of_a_few_view_stack_with_default_options(flipped_phantom):
    """8 views (fewer than the default 10 subsets) of an orbit about world y: SIRT with default options runs."""
    from xwin.intensity import hu_to_mu
    from xwin.io.load import load_volume
    from xwin.kernels import project

    d, _ = flipped_phantom
    v = load_volume(d / "ras.nii.gz")
    A = torch.from_numpy(np.asarray(v.affine))
    centre = A[:3, :3] @ ((torch.tensor(v.data.shape, dtype=torch.float64) - 1) / 2) + A[:3, 3]
    g = _orbit_about_y(centre, torch.linspace(0.0, 2 * math.pi, 9, dtype=torch.float64)[:-1], 24, 40)
    np.save(d / "proj8.npy", project(hu_to_mu(v.data.double()), g, affine=A).numpy().astype(np.float32))
    (d / "geom8.json").write_text(g.to_json())
    res = _run_cli("xwin.reconstruct", "--projections", "proj8.npy", "--geometry", "geom8.json", "--like", "ras.nii.gz",
                   "--method", "sirt", "--iterations", 2, "--quiet", "--out", "rec8", cwd=d)
    assert res.returncode == 0, res.stderr[-500:]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("axis,case", [(0, "full"), (1, "short"), (2, "displaced"), (0, "parallel")])
def test_fdk_reconstructs_mu_on_a_permuted_flipped_anisotropic_grid(axis, case):
    """The scale of every weight: a uniform ellipsoid (μ = 0.02/mm) on a grid whose index axes are permuted,
    flipped and anisotropic, scanned about world axis ``axis`` (full / short / displaced-detector cone scans,
    a 180° parallel scan) and reconstructed onto the same grid: the mean inside is μ within 1.5 %."""
    from xwin.kernels import project

    rng = np.random.default_rng(axis)
    shape = (21, 17, 23)
    A = _axis_affine(rng, shape, (2, 0, 1), (True, False, True))
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    r = np.sqrt((((idx @ A[:3, :3].T + A[:3, 3]) / np.array([8.0, 6.5, 7.0])) ** 2).sum(-1))
    vol = torch.from_numpy(np.where(r < 1, 0.02, 0.0))
    views = 150
    if case == "short":
        ang = torch.linspace(0, math.pi + 0.5, views, dtype=torch.float64)
    else:
        arc = math.pi if case == "parallel" else 2 * math.pi
        ang = torch.linspace(0, arc, views + 1, dtype=torch.float64)[:-1]
    g = circular_orbit(ang, rows=40, cols=36 if case == "displaced" else 50, pixel_size=(0.9, 0.8), sid=70, sdd=105,
                       kind="parallel" if case == "parallel" else "cone",
                       det_offset=(8.0, 0.0) if case == "displaced" else (0.3, 0.2))
    g = _rotate_world(g, axis)
    rec = flt.fdk(project(vol, g, affine=torch.from_numpy(A)), g, shape, affine=A)
    inner = torch.from_numpy(r < 0.6)
    assert abs(float(rec[inner].mean()) / 0.02 - 1) < 0.015
    assert float(rec[torch.from_numpy(r > 1.3)].abs().mean()) < 0.03 * 0.02


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_affine_gradient_matches_finite_differences_for_a_mirrored_oblique_grid(kind):
    """The gradient with respect to the affine (kernels/geomgrad.py) for an oblique, anisotropic affine with a
    negative determinant (a mirrored, LPS-like grid): both methods against central differences."""
    from xwin.kernels import project

    rng = np.random.default_rng(3)
    shape = (6, 5, 4)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    A = np.eye(4)
    A[:3, :3] = q @ np.diag([1.3, -0.7, 1.9])
    A[:3, 3] = -A[:3, :3] @ ((np.array(shape) - 1) / 2)
    assert np.linalg.det(A[:3, :3]) < 0
    vol = torch.from_numpy(rng.uniform(0.2, 1, shape))
    g = circular_orbit(torch.tensor([0.3, 1.9], dtype=torch.float64), rows=4, cols=5, pixel_size=(1.6, 1.4), sid=20,
                       sdd=32, kind=kind, det_offset=(0.4, -0.3))
    w = torch.from_numpy(rng.normal(size=(2, 4, 5)))
    for method in ("trilinear", "siddon"):
        f = lambda M: (project(vol, g, affine=M, method=method, step=0.4) * w).sum()
        Ag = torch.from_numpy(A).clone().requires_grad_()
        f(Ag).backward()
        fd = torch.zeros(4, 4, dtype=torch.float64)
        for i in range(3):
            for j in range(4):
                E = torch.zeros(4, 4, dtype=torch.float64)
                E[i, j] = 1e-6
                fd[i, j] = (f(torch.from_numpy(A) + E) - f(torch.from_numpy(A) - E)) / 2e-6
        assert fd.abs().max() > 0 and float((Ag.grad - fd).norm() / fd.norm()) < 1e-7, method


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_joseph_does_not_depend_on_how_the_grid_is_stored(kind):
    """The same volume stored with index axes 0 and 2 reversed (mirrored affine) projects to the same line
    integrals under Joseph (orbit about world y, permuted anisotropic grid)."""
    from xwin.reconstruct.joseph import JosephProjector

    rng = np.random.default_rng(1)
    shape = (9, 7, 5)
    A = _axis_affine(rng, shape, (1, 2, 0), (False, False, False))
    F = np.diag([-1.0, 1.0, -1.0, 1.0])
    F[0, 3], F[2, 3] = shape[0] - 1, shape[2] - 1
    g = _rotate_world(circular_orbit(torch.linspace(0, 3, 7, dtype=torch.float64), rows=5, cols=8, pixel_size=1.3,
                                     sid=30, sdd=50, kind=kind, det_offset=(0.3, 0.1)), 1)
    x = torch.from_numpy(rng.uniform(0, 1, shape))
    a = JosephProjector(g, shape, affine=A, dtype=torch.float64)(x)
    b = JosephProjector(g, shape, affine=A @ F, dtype=torch.float64)(x.flip(0).flip(2))
    assert a.abs().max() > 0 and rel_err(b, a) < 1e-12
    y = torch.from_numpy(rng.normal(size=a.shape))
    assert rel_err(JosephProjector(g, shape, affine=A @ F, dtype=torch.float64).T(y).flip(0).flip(2),
                   JosephProjector(g, shape, affine=A, dtype=torch.float64).T(y)) < 1e-12
