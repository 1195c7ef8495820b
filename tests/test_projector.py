"""The Projector operator, the custom operators behind it (torch.compile without graph breaks), its input
checks (affine shape, NaN/Inf) and its gradients with respect to the geometry and the affine."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xwin.errors import XwinError
from xwin.geometry import Geometry, circular_orbit
from xwin.kernels import Projector, ProjectorInputError, backproject, project


def _scene(kind="cone"):
    g = circular_orbit([0.2, 1.0, 2.1], rows=4, cols=5, pixel_size=1.5, sid=30, sdd=50, isocenter=(2, 2.5, 1.5),
                       kind=kind)
    aff = np.array([[0.9, 0.2, 0, 0.5], [0.1, 1.1, 0.3, -1], [0, -0.2, 1.5, 0.5], [0, 0, 0, 1]])
    return g, aff


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_projector_equals_project_and_its_T_is_the_adjoint(method, kind):
    g, aff = _scene(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 6, 4, dtype=torch.float64, generator=gen)
    y = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=gen)
    P = Projector(g, (5, 6, 4), affine=aff, method=method)
    px = P(x)
    assert px.shape == (2, 3, 4, 5) and P(x[0]).shape == (3, 4, 5)
    assert torch.equal(px, project(x, g, affine=aff, method=method))
    assert torch.equal(P(x[1]), px[1])
    aty = P.T(y)
    assert aty.shape == (2, 5, 6, 4) and P.T(y[0]).shape == (5, 6, 4)
    assert torch.equal(aty, backproject(y, g, (5, 6, 4), affine=aff, method=method))
    lhs, rhs = (px * y).sum(), (x * aty).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    assert P.T.T is P
    assert P.T(y, torch.float32).dtype == torch.float32


def test_projector_gradients_are_the_adjoint_both_ways():
    g, aff = _scene()
    P = Projector(g[:2], (3, 4, 2), affine=aff)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 2, dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.rand(2, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(P, (x,))
    assert torch.autograd.gradcheck(P.T, (y,))
    # second order: d/dx <P.T(P x) grad, 1> composes the two operators
    assert torch.autograd.gradgradcheck(lambda v: P(v).square().sum(), (x,))


def test_per_volume_affines_fix_the_batch():
    g, aff = _scene()
    affs = np.stack([aff, np.diag([1.2, 1.0, 0.8, 1.0])])
    P = Projector(g, (5, 6, 4), affine=affs)
    x = torch.rand(2, 5, 6, 4, dtype=torch.float64)
    out = P(x)
    assert torch.equal(out[1], project(x[1], g, affine=affs[1]))
    with pytest.raises(ProjectorInputError, match="batch"):
        P(torch.rand(3, 5, 6, 4))
    with pytest.raises(ProjectorInputError, match="built for"):
        P(torch.rand(2, 5, 6, 5))


def test_compiled_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a function calling project (forward and backward): no graph break.

    The aot_eager backend runs the real compile front end (Dynamo with fullgraph, the fake implementations,
    AOT autograd through the registered backward) without inductor's C++ code generation, which takes
    ~100 s on a shared 2-core CPU (measured here); the graph capture is what this test is about."""
    import torch._dynamo

    g, aff = _scene()
    affine = torch.as_tensor(aff)

    def loss(x):
        return (project(x, g, affine=affine) - 1.0).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(2)).requires_grad_()
    got = compiled(x)
    (gc,) = torch.autograd.grad(got, x)
    want = loss(x)
    (ge,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gc, ge)
    assert ge.abs().sum() > 0
    explain = torch._dynamo.explain(loss)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_custom_ops_pass_opcheck():
    from xwin.kernels._ops import backproject_op, project_op

    g, aff = _scene()
    P = Projector(g, (3, 4, 2), affine=aff)
    x = torch.rand(1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(project_op, (x, P.params, P.dt_mm, True, 4, 5, "siddon", "torch", True))
    torch.library.opcheck(backproject_op, (y, P.params, P.dt_mm, True, 3, 4, 2, "siddon", "torch", torch.float64,
                                           True))


def test_affine_of_the_wrong_shape_is_one_clear_line():
    g, _ = _scene()
    for bad in (torch.eye(3), np.eye(3), torch.eye(4)[None].repeat(2, 1, 1)[:, :3]):
        with pytest.raises(ProjectorInputError, match=r"affine must have shape \(4, 4\) or \(B, 4, 4\)") as e:
            project(torch.rand(4, 4, 4), g, affine=bad)
        assert "\n" not in str(e.value)
        assert isinstance(e.value, XwinError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_an_error_unless_switched_off(bad, monkeypatch):
    g, _ = _scene()
    x = torch.rand(4, 5, 3)
    x[1, 2, 1] = bad
    with pytest.raises(ProjectorInputError, match="NaN or Inf"):
        project(x, g)
    y = torch.rand(3, 4, 5)
    y[0, 1, 1] = bad
    with pytest.raises(ProjectorInputError, match="NaN or Inf"):
        backproject(y, g, (4, 5, 3))
    # switched off: the value propagates (the caller asked for no check)
    assert not torch.isfinite(project(x, g, check_finite=False)).all()
    monkeypatch.setenv("XWIN_CHECK_FINITE", "0")
    assert not torch.isfinite(Projector(g, (4, 5, 3))(x)).all()
    with pytest.raises(ProjectorInputError, match="NaN or Inf"):
        project(x, g, check_finite=True)


def test_finite_values_whose_sum_overflows_pass_the_check():
    """The check's fast path is one sum; a finite volume whose float32 sum overflows is still accepted."""
    g, _ = _scene()
    x = torch.full((4, 5, 3), 3e37)
    assert not torch.isfinite(x.sum())
    assert project(x, g).abs().max() > 0


# ---------------------------------------------------------------- gradients with respect to the geometry
_LAST_ROW = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def _geometry_fn(vol, kind, rows, cols, method, step=0.3):
    """project as a function of (first, center, u, v, top 3×4 of the affine)."""
    def f(first, center, u, v, top):
        g = (Geometry.cone if kind == "cone" else Geometry.parallel)(first, center, u, v, rows, cols)
        return project(vol, g, affine=torch.cat([top, _LAST_ROW]), method=method, step=step)
    return f


def _geometry_args(kind, seed=0):
    g, aff = _scene(kind)
    g = g[:2]
    first = g.source if kind == "cone" else g.direction
    return [t.clone().requires_grad_() for t in (first, g.center, g.u, g.v, torch.as_tensor(aff[:3]))], g


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_trilinear_geometry_and_affine_gradcheck(kind):
    """The derivative of the sampled trilinear integral w.r.t. source/direction, center, u, v and the affine
    (through the entry point, the sample positions and the step) passes gradcheck in float64."""
    vol = torch.rand(5, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    args, g = _geometry_args(kind)
    f = _geometry_fn(vol, kind, g.rows, g.cols, "trilinear")
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def _fd(f, args, w, eps=1e-6):
    out = []
    for i, x in enumerate(args):
        fd = torch.zeros_like(x)
        for j in range(x.numel()):
            plus = [a.detach().clone() for a in args]
            minus = [a.detach().clone() for a in args]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            fd.view(-1)[j] = ((f(*plus) - f(*minus)) * w).sum() / (2 * eps)
        out.append(fd)
    return out


@settings(max_examples=16, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["cone", "parallel"]))
def test_siddon_geometry_gradient_matches_finite_differences(seed, kind):
    """Random oblique geometries and affines (ties between voxel-face crossings have measure zero): the
    exact a.e. derivative of the Siddon integral, boundary terms included, equals central differences."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.rand(*s, dtype=torch.float64, generator=gen)
    shape = (4, 5, 3)
    vol = rnd(*shape) + 0.5
    top = torch.cat([torch.eye(3, dtype=torch.float64) * (0.7 + rnd(3)) + 0.2 * (rnd(3, 3) - 0.5), 3 * rnd(3, 1)], 1)
    centre = top[:, :3] @ ((torch.tensor(shape, dtype=torch.float64) - 1) / 2) + top[:, 3]
    d = torch.nn.functional.normalize(rnd(3) - 0.5, dim=0)
    a = torch.nn.functional.normalize(torch.linalg.cross(d, rnd(3) - 0.5), dim=0)
    b = torch.linalg.cross(d, a)
    off = (rnd(3) - 0.5) * 1.5
    first = (centre - 12 * d + off) if kind == "cone" else d
    args = [x.clone().requires_grad_() for x in (first[None], (centre + 9 * d + off)[None], (1.9 * a)[None],
                                                 (1.7 * b)[None], top)]
    f = _geometry_fn(vol, kind, 3, 4, "siddon")
    out = f(*args)
    assert out.abs().max() > 0
    w = rnd(*out.shape)
    grads = torch.autograd.grad((out * w).sum(), args)
    for gx, fd in zip(grads, _fd(f, args, w)):
        assert (gx - fd).norm() <= 1e-6 * max(fd.norm(), 1.0), (gx, fd)


def test_volume_and_geometry_gradients_in_one_backward():
    """One backward fills the volume's gradient (the adjoint) and the geometry's (the per-ray pass), each equal
    to what it is alone."""
    args, g = _geometry_args("cone")
    vol = torch.rand(5, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    f = _geometry_fn(vol, "cone", g.rows, g.cols, "siddon")
    out = f(*args)
    w = torch.rand_like(out)
    (out * w).sum().backward()
    gvol = vol.grad.clone()
    gsrc = args[0].grad.clone()
    assert gsrc.abs().sum() > 0 and gvol.abs().sum() > 0
    top = torch.cat([args[4].detach(), _LAST_ROW])
    gd = Geometry.cone(*(a.detach() for a in args[:4]), g.rows, g.cols)
    torch.testing.assert_close(gvol, backproject(w, gd, vol.shape, affine=top))
    (gsrc_alone,) = torch.autograd.grad((f(*args) * w).sum(), args[0])
    torch.testing.assert_close(gsrc, gsrc_alone)


def test_batched_volumes_sum_their_geometry_gradients():
    args, g = _geometry_args("parallel")
    vol = torch.rand(2, 5, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    f_b = _geometry_fn(vol, "parallel", g.rows, g.cols, "siddon")
    grads_b = torch.autograd.grad(f_b(*args).sum(), args)
    grads_1 = [torch.autograd.grad(_geometry_fn(vol[i], "parallel", g.rows, g.cols, "siddon")(*args).sum(), args)
               for i in range(2)]
    for k in range(5):
        torch.testing.assert_close(grads_b[k], grads_1[0][k] + grads_1[1][k])


def test_fused_siddon_forward_is_the_plain_forward():
    """With geometry gradients wanted, the Siddon forward runs in the walk that also takes the per-ray
    derivatives; its integrals are bit-identical to the plain forward's (float32 and float64)."""
    for dtype in (torch.float32, torch.float64):
        args, g = _geometry_args("cone")
        vol = torch.rand(2, 5, 6, 4, generator=torch.Generator().manual_seed(7)).to(dtype)
        f = _geometry_fn(vol, "cone", g.rows, g.cols, "siddon")
        fused = f(*args)
        plain = f(*(a.detach() for a in args))
        assert fused.requires_grad and not plain.requires_grad
        assert torch.equal(fused.detach(), plain)
