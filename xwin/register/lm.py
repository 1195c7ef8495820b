"""Levenberg–Marquardt on the pose: the default optimiser of :func:`xwin.register.register` (Siddon, NCC family).

Every similarity of the NCC family is a sum of squares: for zero-mean, unit-norm images ``â``, ``b̂``,
``1 − NCC(a, b) = ½‖â − b̂‖²``. So ``1 − similarity = ½‖r‖²`` with a residual vector ``r`` (one block per
NCC term, scaled by the square root of its weight), and the pose can be found by Gauss–Newton with
Levenberg–Marquardt damping instead of many small gradient steps. That needs the Jacobian of every DRR
pixel with respect to the six pose numbers, which the Siddon walk already provides: the fused forward
(``xwin::project_siddon_with_ray_grads``) returns, per ray, ``∂p/∂o`` and ``∂p/∂e`` (origin and direction
in index space) from the same walk that integrates. A rigid motion moves a ray's origin and direction in
closed form, so the pixel Jacobian is a few element-wise products per ray (:func:`drr_and_pose_jacobian`);
the 6×6 normal equations then cost nothing next to the walk.

The pose is updated on the left: the current geometry ``g`` becomes ``apply_pose(g, δω, δt, pivot)``, and
the total motion is composed, so the Jacobian is always taken at ``δ = 0`` where the exponential map's
derivative is the identity.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from xwin.geometry import Geometry
from xwin.pose import apply_pose, so3_exp

__all__ = ["drr_and_pose_jacobian", "residual_terms", "residual_and_jacobian", "LEAST_SQUARES", "lm_level",
           "pool_drr_and_jacobian", "compose_left"]

#: similarities with a least-squares form: (weight, image) terms, image None = the DRR itself, "x"/"y" = its Sobel
#: derivative; 1 − similarity = Σ weight · (1 − NCC(term)) exactly as :mod:`xwin.register.similarity` defines them
LEAST_SQUARES = {"ncc": ((1.0, None),), "gncc": ((0.5, "x"), (0.5, "y")),
                 "ncc+gncc": ((0.5, None), (0.25, "x"), (0.25, "y"))}


#: relative curvature below which a pose direction counts as unobservable (held fixed by the LM step)
NULL_RATIO = 1e-9
#: a Jacobian whose norm (residual per mm of translation or of arc at ``radius``) times ``radius`` is below this is
#: treated as zero: no pose within the CT's size would change the residual visibly (float round-off is ~1e-8)
ZERO_GRADIENT = 1e-4
#: the largest LM step, as a fraction of ``radius`` (rotations counted as arcs at ``radius``): 0.2 ≈ 11.5°; a rejected
#: step shrinks it to a quarter of that step, a kept one lets it grow back
TRUST = 0.2


def drr_and_pose_jacobian(volume: torch.Tensor, geometry: Geometry, affine: torch.Tensor, pivot: torch.Tensor):
    """The Siddon DRR ``(V, rows, cols)`` and its Jacobian ``(V, rows, cols, 6)`` with respect to a rigid motion
    of the geometry about ``pivot``: ``apply_pose(geometry, δω, δt, pivot)`` at ``δω = δt = 0`` (δω in
    radians, δt in mm, in that order).

    ``volume``: (X, Y, Z) float32/float64; ``affine``: (4, 4) float64 tensor; ``pivot``: (3,) world mm.

    Per ray, with ``G_o = M⁻ᵀ ∂p/∂o`` and ``G_e = M⁻ᵀ ∂p/∂e`` the walk's derivatives taken to world
    coordinates (``M`` the affine's 3×3 part): a motion moves the ray's origin ``x`` by ``δω × (x − pivot) + δt``
    and its direction ``w`` by ``δω × w``, and keeps its length, so ``∂p/∂δt = G_o`` and
    ``∂p/∂δω = (x − pivot) × G_o + w × G_e`` (cone beam: ``x`` the source, ``w`` the unit direction to the
    pixel; parallel beam: ``x`` the pixel, ``w`` the beam direction).
    """
    from xwin.kernels._prep import affine_batch, ray_params
    from xwin.kernels.geomgrad import fused_siddon_op

    aff_b = affine_batch(affine)
    params = ray_params(geometry, aff_b)
    V, rows, cols = geometry.num_views, geometry.rows, geometry.cols
    cone = geometry.kind == "cone"
    out, rg = fused_siddon_op(volume[None], params, cone, rows, cols, False)
    dev = volume.device
    minv = torch.linalg.inv(aff_b[0, :3, :3]).to(device=dev, dtype=torch.float64)
    rg = rg[0].to(torch.float64).reshape(V, rows * cols, 7)
    G_o, G_e = rg[..., 0:3] @ minv, rg[..., 3:6] @ minv                    # rows: (M⁻ᵀ g)ᵀ = gᵀ M⁻¹
    piv = pivot.to(device=dev, dtype=torch.float64).reshape(1, 1, 3)
    pix = geometry.pixel_positions().to(device=dev, dtype=torch.float64).reshape(V, rows * cols, 3)
    if cone:
        src = geometry.source.to(device=dev, dtype=torch.float64)[:, None, :]
        d = pix - src
        w = d / d.norm(dim=-1, keepdim=True)
        x = src.expand_as(pix)
    else:
        dirn = geometry.direction.to(device=dev, dtype=torch.float64)
        w = (dirn / dirn.norm(dim=-1, keepdim=True))[:, None, :].expand_as(pix)
        x = pix
    J = torch.cat([torch.linalg.cross(x - piv, G_o) + torch.linalg.cross(w, G_e), G_o], -1)
    return out[0], J.to(out.dtype).reshape(V, rows, cols, 6)


def _sobel_pair(x: torch.Tensor):
    from .similarity import _sobel

    return _sobel(x)


def residual_terms(similarity: str):
    if similarity not in LEAST_SQUARES:
        raise ValueError(f"similarity {similarity!r} has no least-squares form (use one of {sorted(LEAST_SQUARES)})")
    return LEAST_SQUARES[similarity]


def _unit(x: torch.Tensor):
    xc = x - x.mean(1, keepdim=True)
    n = xc.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return xc / n, n


def _unit_and_derivative(x: torch.Tensor, tangents: torch.Tensor):
    """Per row of ``x`` (V, N): ``û = (x − mean)/‖x − mean‖`` and its derivatives along ``tangents`` (V, N, 6)."""
    u, n = _unit(x)
    hc = tangents - tangents.mean(1, keepdim=True)
    du = (hc - u[..., None] * (u[..., None] * hc).sum(1, keepdim=True)) / n[..., None]
    return u, du


def residual_and_jacobian(drr: torch.Tensor, jac: torch.Tensor, target: torch.Tensor, similarity: str):
    """``r`` (M,) with ``1 − similarity(drr, target) = ½‖r‖²`` and ``∂r/∂pose`` (M, 6) from ``∂drr/∂pose``.

    ``drr``, ``target``: (V, H, W); ``jac``: (V, H, W, 6). Views are averaged like the similarities do."""
    V, H, W = drr.shape
    stack = torch.cat([drr[:, None], jac.permute(0, 3, 1, 2)], 1).reshape(V * 7, 1, H, W)
    tgt = target.reshape(V, 1, H, W).to(drr.dtype)
    sob, sob_t = None, None
    rs, js = [], []
    for weight, which in residual_terms(similarity):
        if which is None:
            img, ref = stack.reshape(V, 7, H * W), tgt.reshape(V, 1, -1)
        else:
            if sob is None:
                sob, sob_t = _sobel_pair(stack), _sobel_pair(tgt)
            k = 0 if which == "x" else 1
            img, ref = sob[k].reshape(V, 7, -1), sob_t[k].reshape(V, 1, -1)
        u, du = _unit_and_derivative(img[:, 0], img[:, 1:].transpose(1, 2))
        ut, _ = _unit(ref[:, 0])
        s = math.sqrt(weight / V)
        rs.append((s * (u - ut)).reshape(-1))
        js.append((s * du).reshape(-1, 6))
    return torch.cat(rs), torch.cat(js)


def pool_drr_and_jacobian(drr: torch.Tensor, jac: torch.Tensor, factor: int):
    """Both average-pooled by ``factor`` (cropped at the far end, like :func:`xwin.register.core.image_level`)."""
    if factor == 1:
        return drr, jac
    V, H, W = drr.shape
    Hc, Wc = H // factor * factor, W // factor * factor
    stack = torch.cat([drr[:, None], jac.permute(0, 3, 1, 2)], 1)[:, :, :Hc, :Wc]
    pooled = F.avg_pool2d(stack.reshape(V * 7, 1, Hc, Wc), factor).reshape(V, 7, Hc // factor, Wc // factor)
    return pooled[:, 0], pooled[:, 1:].permute(0, 2, 3, 1)


def compose_left(R: torch.Tensor, t: torch.Tensor, delta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The motion ``(R, t)`` followed by ``(δω, δt) = delta``: ``(exp(δω) R, exp(δω) t + δt)``."""
    Rd = so3_exp(delta[:3])
    return Rd @ R, Rd @ t + delta[3:]


def lm_level(volume: torch.Tensor, affine: torch.Tensor, geometry: Geometry, target: torch.Tensor, R: torch.Tensor,
             t: torch.Tensor, pivot: torch.Tensor, *, similarity: str, pool: int, iterations: int,
             tol_deg: float, tol_mm: float, rtol: float = 0.0, on_render=None, lam: float = 1e-3,
             max_rejects: int = 3, radius: float = 100.0, report: dict = None):
    """Levenberg–Marquardt iterations at one pyramid level; returns ``(R, t, losses, lam)``.

    The geometry ``apply_pose(geometry, R, t, pivot)`` is rendered at the geometry's resolution, its DRR and
    Jacobian average-pooled by ``pool`` and compared with ``target`` (already pooled). A step solves
    ``(JᵀJ + λ diag(JᵀJ)) δ = −Jᵀr``; it is kept when the loss drops (λ ÷ 3), else λ × 10 and retried,
    at most ``max_rejects`` times in a row (then the level ends). Rotations are measured as arcs at ``radius``
    (mm) to compare them with translations; pose directions whose curvature ``JᵀJ`` is below ``NULL_RATIO`` of
    the largest (the translation along a parallel beam, which no image can see) are held fixed, and the same
    fraction of the largest curvature is added to every direction. Steps are also kept within a trust region
    (``TRUST``) that shrinks on every rejection, so an ill-conditioned direction cannot throw the pose far
    away. The level also ends when a kept step moves less than ``tol_deg`` and ``tol_mm`` or lowers the loss by
    less than the fraction ``rtol``, or after ``iterations`` steps. Every render (kept or not) appends its loss
    to ``losses`` and calls ``on_render(loss)``.

    ``report`` (a dict, optional) receives why the level ended — ``"tolerance"`` (a small kept step or gain),
    ``"iterations"``, ``"rejected"`` (``max_rejects`` rejections in a row) or ``"no_gradient"`` (the Jacobian is
    exactly zero at the start: e.g. parallel rays along a voxel axis, where Siddon's integral is piecewise
    constant in the pose, so nothing is moved) — with ``loss`` (the last accepted loss) and ``last_step`` (the
    last tried step, scaled mm).
    """
    report = {} if report is None else report
    losses: List[float] = []

    def evaluate(R_, t_):
        g = apply_pose(geometry, R_, t_, pivot)
        drr, jac = pool_drr_and_jacobian(*drr_and_pose_jacobian(volume, g, affine, pivot), pool)
        r, Jr = residual_and_jacobian(drr, jac, target, similarity)
        r, Jr = r.double(), Jr.double()
        loss = 0.5 * float(r.square().sum())
        losses.append(loss)
        if on_render is not None:
            on_render(loss)
        return r, Jr, loss

    r, Jr, loss = evaluate(R, t)
    scale = torch.tensor([1.0 / radius] * 3 + [1.0] * 3, dtype=torch.float64)
    max_trust = trust = TRUST * radius
    report.update(end="iterations", loss=loss, last_step=0.0)
    if float(Jr.norm()) * radius < ZERO_GRADIENT * math.sqrt(Jr.shape[1]):
        report["end"] = "no_gradient"
        return R, t, losses, lam
    for _ in range(int(iterations)):
        H, g = Jr.T @ (Jr * scale), Jr.T @ r      # in scaled units: rotations as mm of arc at ``radius``
        H = H * scale[:, None]
        g = g * scale
        d = torch.diag(H)
        dmax = float(d.max()) if float(d.max()) > 0 else 1.0
        # directions the images cannot see (the translation along a parallel beam): held fixed
        evals, evecs = torch.linalg.eigh(H)
        null = evecs[:, evals < NULL_RATIO * max(float(evals.max()), 1e-300)]
        rejects = 0
        while True:
            A = H + lam * torch.diag(d.clamp_min(NULL_RATIO * dmax)) + NULL_RATIO * dmax * torch.eye(6, dtype=H.dtype)
            step = -torch.linalg.solve(A, g)
            step = step - null @ (null.T @ step)
            size = float(step.norm())
            if size > trust:                         # a trust region on top of the damping (ill-posed directions)
                step, size = step * (trust / size), trust
            delta = step * scale
            R2, t2 = compose_left(R, t, delta)
            r2, Jr2, loss2 = evaluate(R2, t2)
            report["last_step"] = size
            if loss2 < loss:
                gain = (loss - loss2) / max(loss, 1e-30)
                R, t, r, Jr, loss = R2, t2, r2, Jr2, loss2
                lam = max(lam / 3.0, 1e-7)
                trust = min(max_trust, max(trust, 2.0 * size))
                report["loss"] = loss
                break
            lam *= 10.0
            trust = size / 4.0
            rejects += 1
            if rejects >= max_rejects:
                report["end"] = "rejected"
                return R, t, losses, lam
        if (math.degrees(float(delta[:3].norm())) < tol_deg and float(delta[3:].norm()) < tol_mm) or gain < rtol:
            report["end"] = "tolerance"
            break
    return R, t, losses, lam
