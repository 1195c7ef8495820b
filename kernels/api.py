"""Public projector API: the :class:`Projector` operator, ``project`` (differentiable) and ``backproject``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from xwin.geometry import Geometry

from ._backend import BACKENDS, resolve_backend as _resolve, triton_available
from ._ops import backproject_op, project_op
from ._prep import (ProjectorInputError, affine_batch, as_batched, check_finite_default, check_geometry, check_method,
                    check_shape, check_volume, min_spacing, output_dtype, ray_params)

__all__ = ["Projector", "project", "backproject", "triton_available", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    return _resolve(backend, device, ProjectorInputError)


class Projector:
    """The X-ray transform of one geometry as an operator, with its ray parameters prepared once.

    ``P = Projector(geometry, (X, Y, Z), affine=..., method="siddon")``; then ``P(x)`` projects a
    (X, Y, Z) or (B, X, Y, Z) volume to (V, rows, cols) / (B, V, rows, cols) line integrals and
    ``P.T(y)`` is the exact adjoint (``⟨P x, y⟩ = ⟨x, P.T y⟩``). Both are differentiable (each is the
    other's gradient), and, because they run as the ``torch.library`` operators ``xwin::project`` /
    ``xwin::backproject``, ``torch.compile(fullgraph=True)`` traces them without a graph break.

    When the geometry's tensors or the affine require grad, ``P(x)`` is also differentiable with respect
    to them (see :mod:`xwin.kernels.geomgrad`); build a new ``Projector`` (or call :func:`project`) after
    changing the geometry.

    Args:
        geometry: an :class:`xwin.geometry.Geometry` (cone or parallel beam, V views).
        volume_shape: (X, Y, Z).
        affine: voxel index → world mm, (4, 4) shared by the batch or (B, 4, 4) (then volumes must come in
            batches of B); default identity.
        method: ``"siddon"`` or ``"trilinear"``; ``step``: trilinear step in units of the smallest spacing.
        backend: ``"auto"`` (Triton for CUDA tensors, torch reference otherwise), ``"triton"``, ``"torch"``.
        check_finite: raise :class:`ProjectorInputError` when the input holds NaN or Inf (one ``isfinite``
            reduction per call). Default on; ``XWIN_CHECK_FINITE=0`` in the environment changes the default.
    """

    def __init__(self, geometry: Geometry, volume_shape: Sequence[int], *, affine=None, method: str = "siddon",
                 step: float = 0.5, backend: str = "auto", check_finite: Optional[bool] = None):
        self.method, self.step = check_method(method, step)
        self.geometry = check_geometry(geometry)
        self.shape = check_shape(volume_shape)
        if backend not in BACKENDS:
            raise ProjectorInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.check_finite = check_finite_default(check_finite)
        self.affine = affine_batch(affine)                            # (1 or B, 4, 4) float64 CPU
        self.params = ray_params(self.geometry, self.affine)          # (1 or B, V, 24) float64 CPU
        self.dt_mm = self.step * min_spacing(self.affine)             # (1 or B,) mm

    # -------------------------------------------------------------------------------- helpers
    @property
    def cone(self) -> bool:
        return self.geometry.kind == "cone"

    @property
    def detector(self):
        """(V, rows, cols) of one projection stack."""
        g = self.geometry
        return g.num_views, g.rows, g.cols

    def _prepare(self, batch: int, device: torch.device):
        if self.params.shape[0] not in (1, batch):
            raise ProjectorInputError(f"affine has {self.params.shape[0]} entries but the volume batch has {batch}")
        check_geometry(self.geometry, device)
        return resolve_backend(self.backend, device)

    def __repr__(self) -> str:
        return (f"Projector({self.geometry!r}, volume_shape={self.shape}, method={self.method!r}, "
                f"backend={self.backend!r})")

    # -------------------------------------------------------------------------------- the operator
    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """(X, Y, Z) or (B, X, Y, Z) volume -> (V, rows, cols) or (B, V, rows, cols) line integrals."""
        vol4, squeeze = check_volume(volume)
        if tuple(vol4.shape[1:]) != self.shape:
            raise ProjectorInputError(f"volume has shape {tuple(vol4.shape[1:])} but the projector was built for "
                                      f"{self.shape}")
        backend = self._prepare(vol4.shape[0], vol4.device)
        g = self.geometry
        if self.method == "siddon" and backend == "torch" and self.params.requires_grad:
            # geometry gradients wanted: the walk that integrates also takes each ray's derivatives
            from .geomgrad import fused_siddon_op

            out = fused_siddon_op(vol4, self.params, self.cone, g.rows, g.cols, self.check_finite)[0]
        else:
            out = project_op(vol4, self.params, self.dt_mm, self.cone, g.rows, g.cols, self.method, backend,
                             self.check_finite)
        return out[0] if squeeze else out

    def adjoint(self, projections: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The exact adjoint: (V, rows, cols) or (B, V, rows, cols) -> (X, Y, Z) or (B, X, Y, Z) of ``dtype``
        (default float64 for float64 projections, else float32)."""
        p4, squeeze = as_batched(projections, "projections", "(V, rows, cols)")
        if tuple(p4.shape[1:]) != self.detector:
            raise ProjectorInputError(f"projections have shape {tuple(p4.shape[1:])} per batch entry but the "
                                      f"geometry describes (views, rows, cols) = {self.detector}")
        backend = self._prepare(p4.shape[0], p4.device)
        dtype = output_dtype(p4.dtype) if dtype is None else dtype
        out = backproject_op(p4, self.params, self.dt_mm, self.cone, *self.shape, self.method, backend, dtype,
                             self.check_finite)
        return out[0] if squeeze else out

    @property
    def T(self) -> "_Adjoint":
        """The adjoint operator: ``P.T(y)`` backprojects, ``P.T.T`` is ``P``."""
        return _Adjoint(self)


class _Adjoint:
    def __init__(self, op: Projector):
        self._op = op

    def __call__(self, projections: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self._op.adjoint(projections, dtype)

    @property
    def T(self) -> Projector:
        return self._op

    def __repr__(self) -> str:
        return f"{self._op!r}.T"


def project(volume: torch.Tensor, geometry: Geometry, *, affine=None, method: str = "siddon",
            step: float = 0.5, backend: str = "auto", check_finite: Optional[bool] = None) -> torch.Tensor:
    """Line integrals of ``volume`` along the rays of ``geometry`` (``Projector(...)(volume)``).

    Args:
        volume: (X, Y, Z) or (B, X, Y, Z) tensor, indexed like ``nibabel.load(f).get_fdata()``;
            float32/float64, or float16/bfloat16 storage (accumulated in float32).
        geometry: an :class:`xwin.geometry.Geometry` (cone or parallel beam, V views).
        affine: voxel index → world mm, (4, 4) shared by the batch or (B, 4, 4); default identity.
        method: ``"siddon"`` (exact integral of the nearest-voxel volume) or ``"trilinear"``
            (midpoint-rule integral of the zero-padded trilinear interpolant).
        step: trilinear sample step in units of the smallest voxel spacing.
        backend: ``"auto"`` (Triton for CUDA tensors, torch reference otherwise), ``"triton"``, ``"torch"``.
        check_finite: NaN/Inf in the volume is a :class:`ProjectorInputError` (default; costs one
            ``isfinite`` pass over the volume). ``False`` (or ``XWIN_CHECK_FINITE=0``) skips it.

    Returns:
        (V, rows, cols) or (B, V, rows, cols) line integrals ∫ volume dl with dl in mm, float32
        (float64 for a float64 volume). Differentiable with respect to ``volume`` (the gradient is
        :func:`backproject`, the exact adjoint) and to the geometry's tensors and the affine when they
        require grad.
    """
    vol4, _ = check_volume(volume)
    P = Projector(geometry, vol4.shape[1:], affine=affine, method=method, step=step, backend=backend,
                  check_finite=check_finite)
    return P(volume)


def backproject(projections: torch.Tensor, geometry: Geometry, volume_shape: Sequence[int], *, affine=None,
                method: str = "siddon", step: float = 0.5, backend: str = "auto",
                dtype: Optional[torch.dtype] = None, check_finite: Optional[bool] = None) -> torch.Tensor:
    """The exact adjoint (transpose) of :func:`project` (``Projector(...).T(projections)``).

    Args:
        projections: (V, rows, cols) or (B, V, rows, cols), matching ``geometry``.
        volume_shape: (X, Y, Z) of the volume to fill.
        dtype: output dtype (default: float64 for float64 projections, else float32).

    Returns:
        (X, Y, Z) or (B, X, Y, Z): for every voxel, the sum over rays of (ray weight of that voxel ×
        projection value), so that ⟨project(x), y⟩ = ⟨x, backproject(y)⟩.
    """
    as_batched(projections, "projections", "(V, rows, cols)")
    check_geometry(geometry)
    P = Projector(geometry, volume_shape, affine=affine, method=method, step=step, backend=backend,
                  check_finite=check_finite)
    return P.T(projections, dtype)
