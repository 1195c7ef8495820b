"""The projector as ``torch.library`` custom operators: ``xwin::project`` and ``xwin::backproject``.

They are declared with the low-level ``torch.library.Library`` API (schema + one
CompositeExplicitAutograd kernel for every device): ``torch.library.custom_op`` wraps its kernel in a
dynamo-disable decorator that imports ``torch._dynamo`` (~900 modules, 3–10 s measured on the shared
2-core machine) on the first eager call of every process, which every CLI would pay.

Each has a fake (meta) implementation, so ``torch.compile`` traces through them without a graph break, and
registered autograd: the gradient of ``project`` with respect to the volume is ``backproject`` (its exact
adjoint) and vice versa, so gradients of any order compose from the two operators. The gradient with
respect to the ray record ``params`` (and through it the geometry and the affine) is the dedicated per-ray
pass of :mod:`xwin.kernels.geomgrad`.

Arguments shared by both: ``params`` (B or 1, V, 24) float64 ray records (:mod:`xwin.kernels.layout`),
``dt_mm`` (B or 1,) float64 trilinear steps in mm (both may require grad), ``cone``, ``method``, ``backend`` ("torch" or
"triton", already resolved) and ``check_finite`` (raise ProjectorInputError on NaN/Inf input, one
``isfinite`` reduction done inside the operator so it also runs under ``torch.compile``).
"""

from __future__ import annotations

import torch

from ._prep import check_all_finite, output_dtype

__all__ = ["project_op", "backproject_op"]


def _impl(backend: str):
    if backend == "torch":
        from . import reference
        return reference
    from . import _triton
    return _triton


def _batched(params: torch.Tensor, dt_mm: torch.Tensor, B: int):
    return params.detach().expand(B, -1, -1), dt_mm.detach().expand(B)


_LIB = torch.library.Library("xwin", "DEF")
_LIB.define("project(Tensor volume, Tensor params, Tensor dt_mm, bool cone, int rows, int cols, str method, "
            "str backend, bool check_finite) -> Tensor")
_LIB.define("backproject(Tensor proj, Tensor params, Tensor dt_mm, bool cone, int nx, int ny, int nz, str method, "
            "str backend, ScalarType out_dtype, bool check_finite) -> Tensor")


@torch.library.impl(_LIB, "project", "CompositeExplicitAutograd")
def _project_impl(volume, params, dt_mm, cone, rows, cols, method, backend, check_finite):
    """(B, X, Y, Z) volume -> (B, V, rows, cols) line integrals."""
    if check_finite:
        check_all_finite(volume, "volume")
    prm, dts = _batched(params, dt_mm, volume.shape[0])
    return _impl(backend).forward(volume.contiguous(), prm, "cone" if cone else "parallel", rows, cols, method, dts)


@torch.library.register_fake("xwin::project", lib=_LIB)
def _(volume, params, dt_mm, cone, rows, cols, method, backend, check_finite):
    return volume.new_empty((volume.shape[0], params.shape[1], rows, cols), dtype=output_dtype(volume.dtype))


@torch.library.impl(_LIB, "backproject", "CompositeExplicitAutograd")
def _backproject_impl(proj, params, dt_mm, cone, nx, ny, nz, method, backend, out_dtype, check_finite):
    """(B, V, rows, cols) -> (B, nx, ny, nz) of ``out_dtype``: the exact transpose of ``project``."""
    if check_finite:
        check_all_finite(proj, "projections")
    prm, dts = _batched(params, dt_mm, proj.shape[0])
    return _impl(backend).adjoint(proj.contiguous(), prm, "cone" if cone else "parallel", (nx, ny, nz), method, dts,
                                  out_dtype)


@torch.library.register_fake("xwin::backproject", lib=_LIB)
def _(proj, params, dt_mm, cone, nx, ny, nz, method, backend, out_dtype, check_finite):
    return proj.new_empty((proj.shape[0], nx, ny, nz), dtype=out_dtype)


project_op = torch.ops.xwin.project.default
backproject_op = torch.ops.xwin.backproject.default


# ------------------------------------------------------------------------------------------ autograd

def _project_setup(ctx, inputs, output):
    volume, params, dt_mm, cone, rows, cols, method, backend, _ = inputs
    ctx.meta = (cone, tuple(volume.shape[1:]), method, backend, volume.dtype)
    geo = params.requires_grad or dt_mm.requires_grad
    ctx.save_for_backward(params, dt_mm, volume if geo else None)


def _project_backward(ctx, grad):
    params, dt_mm, volume = ctx.saved_tensors
    cone, (X, Y, Z), method, backend, vdt = ctx.meta
    grad = grad.contiguous()
    gvol = gparams = gdt = None
    if ctx.needs_input_grad[0]:
        gvol = backproject_op(grad, params, dt_mm, cone, X, Y, Z, method, backend, vdt, False)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        from .geomgrad import geometry_grad_op
        gparams, gdt = geometry_grad_op(volume, grad, params, dt_mm, cone, method, backend)
        if gparams.shape[0] != params.shape[0]:          # one record broadcast over the batch
            gparams, gdt = gparams.sum(0, keepdim=True), gdt.sum(0, keepdim=True)
        gparams, gdt = gparams.to(params.dtype), gdt.to(dt_mm.dtype)
    return gvol, gparams, gdt, None, None, None, None, None, None


def _backproject_setup(ctx, inputs, output):
    proj, params, dt_mm, cone, nx, ny, nz, method, backend, out_dtype, _ = inputs
    ctx.meta = (cone, proj.shape[2], proj.shape[3], method, backend, proj.dtype)
    ctx.save_for_backward(params, dt_mm)


def _backproject_backward(ctx, grad):
    params, dt_mm = ctx.saved_tensors
    cone, rows, cols, method, backend, pdt = ctx.meta
    gproj = None
    if ctx.needs_input_grad[0]:
        gproj = project_op(grad.contiguous(), params, dt_mm, cone, rows, cols, method, backend, False).to(pdt)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise NotImplementedError("the gradient of backproject with respect to the geometry is not implemented")
    return gproj, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("xwin::project", _project_backward, setup_context=_project_setup, lib=_LIB)
torch.library.register_autograd("xwin::backproject", _backproject_backward, setup_context=_backproject_setup, lib=_LIB)
