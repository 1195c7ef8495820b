"""The Joseph projector (xwin.reconstruct.joseph): against a per-ray numpy oracle, the dot test for its
adjoint, float32 vs float64, and bad input. (Against RTK's own Joseph projector: tests/test_rtk.py.)"""

import math

import numpy as np
import pytest
import torch

from xwin.errors import XwinError
from xwin.geometry import Geometry, circular_orbit
from xwin.reconstruct.joseph import JosephError, JosephProjector


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _affine(rng):
    """Anisotropic spacing, a rotation and a translation."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q @ np.diag(rng.uniform(0.7, 1.6, 3))
    a[:3, 3] = rng.normal(scale=3, size=3)
    return a


def _centre(shape, a):
    return a[:3, :3] @ ((np.asarray(shape) - 1) / 2) + a[:3, 3]


def _random_cone(rng, shape, a, views=3, rows=5, cols=6, inside=False):
    c0 = _centre(shape, a)
    src, cen, us, vs = [], [], [], []
    for _ in range(views):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        s = c0 - d * (rng.uniform(0, 4) if inside else rng.uniform(30, 60))
        src.append(s)
        cen.append(c0 + d * rng.uniform(20, 40))
        u = np.cross(d, rng.normal(size=3))
        u /= np.linalg.norm(u)
        v = np.cross(d, u) + 0.2 * u                                     # a skewed detector
        us.append(u * rng.uniform(1.5, 3.0))
        vs.append(v * rng.uniform(1.5, 3.0))
    t = lambda x: torch.tensor(np.array(x))
    return Geometry.cone(t(src), t(cen), t(us), t(vs), rows, cols)


def _oracle(vol, g: Geometry, a):
    """Joseph by hand, one ray and one plane at a time (float64 numpy)."""
    vol = np.asarray(vol, dtype=np.float64)
    N = np.array(vol.shape)
    minv = np.linalg.inv(a)
    pix = g.pixel_positions().numpy()
    out = np.zeros(pix.shape[:3])
    for n in range(g.num_views):
        for r in range(g.rows):
            for c in range(g.cols):
                p = minv[:3, :3] @ pix[n, r, c] + minv[:3, 3]
                if g.is_cone:
                    o = minv[:3, :3] @ g.source[n].numpy() + minv[:3, 3]
                    d = p - o
                else:
                    o, d = p, minv[:3, :3] @ g.direction[n].numpy()
                ax = int(np.argmax(np.abs(d)))
                b1, b2 = [i for i in range(3) if i != ax]
                total = 0.0
                for pl in range(N[ax]):
                    tau = (pl - o[ax]) / d[ax]
                    if g.is_cone and not (0 <= tau <= 1):
                        continue
                    q = o + tau * d
                    f1, f2 = math.floor(q[b1]), math.floor(q[b2])
                    for i1, w1 in ((f1, 1 - (q[b1] - f1)), (f1 + 1, q[b1] - f1)):
                        for i2, w2 in ((f2, 1 - (q[b2] - f2)), (f2 + 1, q[b2] - f2)):
                            if 0 <= i1 < N[b1] and 0 <= i2 < N[b2]:
                                idx = [0, 0, 0]
                                idx[ax], idx[b1], idx[b2] = pl, i1, i2
                                total += w1 * w2 * vol[tuple(idx)]
                out[n, r, c] = total * np.linalg.norm(a[:3, :3] @ d) / abs(d[ax])
    return out


@pytest.mark.parametrize("case", ["cone", "cone-source-inside", "parallel"])
def test_joseph_matches_a_per_ray_oracle_and_its_adjoint_is_exact(case):
    rng = np.random.default_rng({"cone": 1, "cone-source-inside": 2, "parallel": 3}[case])
    shape = (7, 9, 8)
    a = _affine(rng)
    if case == "parallel":
        cone = _random_cone(rng, shape, a)
        d = cone.center - cone.source
        g = Geometry.parallel(d, cone.center - 0.3 * d, cone.u, cone.v, cone.rows, cone.cols)
    else:
        g = _random_cone(rng, shape, a, inside=case.endswith("inside"))
    x = torch.from_numpy(rng.uniform(0.5, 2.0, shape))
    A = JosephProjector(g, shape, affine=a, dtype=torch.float64)
    if case == "cone-source-inside":                                     # rays that start inside the volume
        src = (np.linalg.inv(a)[:3, :3] @ g.source.numpy().T).T + np.linalg.inv(a)[:3, 3]
        assert ((src > 0) & (src < np.asarray(shape) - 1)).all(axis=1).any()
    ours = A(x).numpy()
    ref = _oracle(x.numpy(), g, a)
    assert np.abs(ref).max() > 1.0                                       # the rays do cross the volume
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-9
    y = torch.from_numpy(rng.normal(size=A.out_shape))
    lhs, rhs = float((A(x) * y).sum()), float((x * A.T(y)).sum())
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))


def test_joseph_circular_orbit_float32_chunks_and_cache_agree_with_float64():
    shape = (20, 18, 16)
    a = np.diag([1.5, 1.5, 2.0, 1.0])
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    g = circular_orbit(torch.linspace(0, 2 * math.pi, 13, dtype=torch.float64)[:-1], rows=12, cols=20,
                       pixel_size=(3.0, 2.5), sid=200, sdd=300)
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.rand((12, 12, 20), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = JosephProjector(g, shape, affine=a, dtype=torch.float64)
    small = JosephProjector(g, shape, affine=a, chunk_bytes=4096, cache_bytes=1 << 30)   # many chunks, cached
    assert sum(len(c) for _, _, c in small.groups) > 10 and small.cached_bytes > 0
    p64, b64 = ref(x), ref.T(y)
    for _ in range(2):                                                   # second call: from the cache
        p32, b32 = small(x.float()), small.T(y.float())
        assert p32.dtype == torch.float32 and b32.dtype == torch.float32
        assert float((p32.double() - p64).norm() / p64.norm()) < 1e-5
        assert float((b32.double() - b64).norm() / b64.norm()) < 1e-5
    # a 360° orbit about the volume axis sees each main axis
    assert len(ref.groups) == 2


def test_joseph_rejects_bad_input():
    g = circular_orbit(torch.zeros(2, dtype=torch.float64), rows=4, cols=5)
    A = JosephProjector(g, (4, 4, 4))
    with pytest.raises(JosephError, match="shape"):
        A(torch.zeros(4, 4, 5))
    with pytest.raises(JosephError, match="shape"):
        A.T(torch.zeros(2, 5, 4))
    with pytest.raises(JosephError, match="floating"):
        A(torch.zeros(4, 4, 4, dtype=torch.int32))
    with pytest.raises(XwinError, match="volume_shape"):
        JosephProjector(g, (4, 4))
    with pytest.raises(XwinError, match="affine"):
        JosephProjector(g, (4, 4, 4), affine=np.zeros((4, 4)))
    with pytest.raises(XwinError, match="dtype"):
        JosephProjector(g, (4, 4, 4), dtype=torch.float16)
