"""The FDK voxel-driven backprojection: torch reference vs an independent numpy oracle, Triton (interpreter
without a GPU) vs the reference (its ahead-of-time compile: tests/test_aot.py)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import rel_err, scenes
from xwin.geometry import Geometry, circular_orbit
from xwin.kernels import triton_available
from xwin.kernels.fdk_backproject import (FDKBackprojectError, backproject_reference, backproject_separable,
                                          backproject_triton, fdk_backproject, separable_axis, view_matrices)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK = triton_available(DEV)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run here (no CUDA, no interpreter)")

OBLIQUE = np.array([[1.5, 0.2, 0.0, -7.0], [0.0, 1.2, 0.1, 5.0], [0.1, 0.0, 2.0, -9.0], [0, 0, 0, 1.0]])


def oracle(q: np.ndarray, geom: Geometry, affine: np.ndarray, shape, distance_weight: bool) -> np.ndarray:
    """Straight from the definition, one voxel and one view at a time: intersect the ray through the voxel
    centre with the detector plane, solve for (a, b) in the (u, v) basis, bilinear with zero padding."""
    V, R, C = q.shape
    out = np.zeros(shape)
    for vi in range(V):
        Cn, u, v = (t[vi].numpy() for t in (geom.center, geom.u, geom.v))
        n = np.cross(u, v)
        n /= np.linalg.norm(n)
        basis = np.stack([u, v, n], 1)
        for idx in np.ndindex(*shape):
            X = affine[:3, :3] @ np.array(idx, dtype=np.float64) + affine[:3, 3]
            if geom.kind == "cone":
                S = geom.source[vi].numpy()
                nn = n if np.dot(n, Cn - S) > 0 else -n
                w = np.dot(nn, X - S)
                if w <= 0:
                    continue
                lam = np.dot(nn, Cn - S) / w
                P = S + lam * (X - S)
                weight = 1.0 / w**2 if distance_weight else 1.0
            else:
                d = geom.direction[vi].numpy()
                t = np.dot(n, Cn - X) / np.dot(n, d)
                P = X + t * d
                weight = 1.0
            a, b, _ = np.linalg.solve(basis, P - Cn)
            col, row = a + (C - 1) / 2, b + (R - 1) / 2
            c0, r0 = math.floor(col), math.floor(row)
            fc, fr = col - c0, row - r0
            val = 0.0
            for rr, wr in ((r0, 1 - fr), (r0 + 1, fr)):
                for cc, wc in ((c0, 1 - fc), (c0 + 1, fc)):
                    if 0 <= rr < R and 0 <= cc < C:
                        val += wr * wc * q[vi, rr, cc]
            out[idx] += weight * val
    return out


def _orbit(kind, V=5, rows=7, cols=8, sid=30.0):
    ang = torch.linspace(0.1, 2 * math.pi + 0.1, V + 1)[:-1]
    return circular_orbit(ang, rows=rows, cols=cols, pixel_size=(2.1, 1.7), sid=sid, sdd=1.6 * sid, kind=kind,
                          det_offset=(0.7, -0.4))


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("distance_weight", [True, False])
def test_reference_matches_oracle(kind, distance_weight):
    shape = (5, 4, 6)
    # sid 9 mm: part of the volume sits behind the source in some views (those voxels must get nothing)
    geom = _orbit(kind, sid=9.0 if kind == "cone" else 30.0)
    q = torch.rand(geom.num_views, geom.rows, geom.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = backproject_reference(q, view_matrices(geom, OBLIQUE), shape, distance_weight=distance_weight)
    want = oracle(q.numpy(), geom, OBLIQUE, shape, distance_weight)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    if kind == "cone":   # the test really has voxels behind the source
        w = torch.einsum("vk,xyzk->vxyz", view_matrices(geom, OBLIQUE)[:, 2],
                         torch.cat([torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape],
                                                               indexing="ij"), -1),
                                    torch.ones(*shape, 1, dtype=torch.float64)], -1))
        assert (w <= 0).any() and (w > 0).any()


def test_reference_batch_and_chunking():
    geom = _orbit("cone", V=6)
    g = torch.Generator().manual_seed(1)
    q = torch.rand(2, 6, geom.rows, geom.cols, dtype=torch.float64, generator=g)
    M = view_matrices(geom, OBLIQUE)
    full = backproject_reference(q, M, (6, 5, 7))
    small = backproject_reference(q, M, (6, 5, 7), budget=6 * 13)        # many voxel chunks
    assert torch.allclose(full, small, rtol=1e-12, atol=0)
    for b in range(2):
        assert torch.allclose(full[b], backproject_reference(q[b], M, (6, 5, 7)), rtol=1e-12, atol=0)


def test_single_row_and_column_detectors():
    geom = circular_orbit(torch.tensor([0.0, 1.0, 2.0]), rows=1, cols=1, pixel_size=3.0, sid=30, sdd=45)
    q = torch.ones(3, 1, 1, dtype=torch.float64)
    shape = (3, 3, 3)
    aff = np.eye(4)
    aff[:3, 3] = -1
    got = backproject_reference(q, view_matrices(geom, aff), shape, distance_weight=False)
    want = oracle(q.numpy(), geom, aff, shape, False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert got[1, 1, 1] == pytest.approx(3.0)      # the centre projects onto the single pixel in every view


def test_bad_inputs_raise_clear_errors():
    geom = _orbit("cone")
    M = view_matrices(geom)
    q = torch.rand(geom.num_views, geom.rows, geom.cols)
    with pytest.raises(FDKBackprojectError, match="views"):
        backproject_reference(q[:-1], M, (4, 4, 4))
    with pytest.raises(FDKBackprojectError, match="float32 or float64"):
        backproject_reference(q.to(torch.int32), M, (4, 4, 4))
    with pytest.raises(FDKBackprojectError, match="volume_shape"):
        backproject_reference(q, M, (4, 0, 4))
    with pytest.raises(FDKBackprojectError, match="NaN"):
        backproject_reference(q, M * float("nan"), (4, 4, 4))
    with pytest.raises(FDKBackprojectError, match="backend"):
        fdk_backproject(q, M, (4, 4, 4), backend="cuda")
    with pytest.raises(FDKBackprojectError, match="geometry"):
        view_matrices("not a geometry")


# ---------------------------------------------------------------------------------------- Triton vs reference

@needs_triton
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_triton_matches_reference_on_orbits(kind):
    geom = _orbit(kind, V=6, sid=9.0 if kind == "cone" else 30.0)
    g = torch.Generator().manual_seed(2)
    q = torch.rand(2, geom.num_views, geom.rows, geom.cols, dtype=torch.float64, generator=g)
    M = view_matrices(geom, OBLIQUE)
    shape = (7, 6, 9)            # 378 voxels: two programs, the second one partly masked
    for dw in (True, False):
        ref = backproject_reference(q, M, shape, distance_weight=dw)
        got = backproject_triton(q.to(DEV), M, shape, distance_weight=dw).cpu()
        assert got.dtype == torch.float64
        assert rel_err(got, ref) <= 1e-12
        got32 = backproject_triton(q.float().to(DEV), M, shape, distance_weight=dw).cpu()
        assert got32.dtype == torch.float32
        assert rel_err(got32, ref) <= 2e-5


@needs_triton
def test_triton_matches_reference_on_random_vector_geometries():
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(scenes(max_size=6), st.booleans())
    def prop(scene, dw):
        shape, affine, geom = scene
        q = torch.rand(geom.num_views, geom.rows, geom.cols, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(3)) + 0.25
        M = view_matrices(geom, affine)
        ref = backproject_reference(q, M, shape, distance_weight=dw)
        got = backproject_triton(q.to(DEV), M, shape, distance_weight=dw).cpu()
        # absolute scale: every view adding max(q) × its largest distance weight (a voxel that lands exactly
        # on the detector's edge may get 0 from one and a rounding-level tap from the other)
        ijk = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
        w = ijk.reshape(-1, 3) @ M[:, 2, :3].T + M[:, 2, 3]
        wt = torch.where(w > 0, w.clamp(min=1e-300) ** -2.0, 0.0) if dw else (w > 0).double()
        scale = float(wt.max(0).values.sum()) * float(q.max()) + 1e-300
        assert (got - ref).abs().max() <= 1e-9 * scale
        assert rel_err(got, ref) <= 1e-9 or ref.norm() <= 1e-6 * scale

    prop()


@needs_triton
@pytest.mark.parametrize("int64", [False, True])
def test_triton_writes_every_voxel_once(int64):
    """Poison the output, launch the kernel directly (both index widths) and check every voxel."""
    geom = _orbit("cone", V=4)
    q = torch.rand(4, geom.rows, geom.cols, generator=torch.Generator().manual_seed(4)).to(DEV)
    M = view_matrices(geom, OBLIQUE).to(torch.float32).to(DEV).contiguous()
    shape = (5, 7, 9)
    out = torch.full(shape, float("nan"), device=DEV)
    nvox = int(np.prod(shape))
    import triton.language as tl

    from xwin.kernels import fdk

    fdk.fdk_backproject_kernel[(math.ceil(nvox / fdk.BLOCK), 1)](
        q, M, out, 4, geom.rows, geom.cols, *shape, DIST_WEIGHT=True, DTYPE=tl.float32, INT64=int64,
        BLOCK=fdk.BLOCK)
    assert torch.isfinite(out).all()
    ref = backproject_reference(q.cpu().double(), view_matrices(geom, OBLIQUE), shape)
    assert rel_err(out.cpu(), ref) <= 2e-5


def test_auto_backend_on_cpu_is_the_torch_path():
    """On CPU tensors "auto" runs torch: the separable fast path when the orbit allows it (here: about z, so
    volume axis 2), the general reference otherwise (tests/test_fdk_fast.py compares the two in depth)."""
    geom = _orbit("parallel")
    q = torch.rand(geom.num_views, geom.rows, geom.cols, dtype=torch.float64)
    M = view_matrices(geom)
    assert separable_axis(M, (3, 4, 5), geom.rows, geom.cols) == 2
    assert torch.equal(fdk_backproject(q, M, (3, 4, 5)), backproject_separable(q, M, (3, 4, 5)))
    assert rel_err(fdk_backproject(q, M, (3, 4, 5)), backproject_reference(q, M, (3, 4, 5))) <= 1e-12
    Mo = view_matrices(geom, OBLIQUE)                                # sheared grid: no separable axis
    assert separable_axis(Mo, (3, 4, 5), geom.rows, geom.cols) is None
    assert torch.equal(fdk_backproject(q, Mo, (3, 4, 5)), backproject_reference(q, Mo, (3, 4, 5)))


# (ahead-of-time compilation of the kernel for sm_80 / sm_90: tests/test_aot.py, with every other kernel)


@pytest.mark.gpu
def test_gpu_fdk_kernel_matches_reference_at_scan_size_and_is_fast():
    """On a CUDA device: the sample-CT-sized FDK backprojection (128×128×133, 360 views of 181×190) against the
    torch reference on the same device, and its time (printed; run with -s to see it)."""
    import triton.testing

    geom = circular_orbit(torch.arange(360, dtype=torch.float64) * 2 * math.pi / 360, rows=181, cols=190,
                          pixel_size=(3.75, 4.22), sid=1000, sdd=1500)
    aff = np.diag([2.8125, 2.8125, 2.5, 1.0])
    aff[:3, 3] = [-178.6, -178.6, -165.0]
    shape = (128, 128, 133)
    q = torch.rand(360, 181, 190, generator=torch.Generator().manual_seed(5)).cuda()
    M = view_matrices(geom, aff)
    ref = backproject_reference(q.double(), M, shape)
    got = backproject_triton(q, M, shape)
    assert rel_err(got, ref) <= 1e-5
    ms = triton.testing.do_bench(lambda: backproject_triton(q, M, shape))
    vox_views = 128 * 128 * 133 * 360
    print(f"\nFDK backprojection 128x128x133 x 360 views (fp32): {ms:.2f} ms, {vox_views / ms / 1e6:.1f} G voxel-views/s")
