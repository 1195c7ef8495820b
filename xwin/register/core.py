"""2D/3D rigid registration: the pose of a CT's imaging geometry that makes its DRR match an X-ray.

The unknown is a rigid motion of the whole imaging system (:func:`xwin.pose.apply_pose`): an axis-angle
rotation ``ω`` about a pivot (the CT's centre by default) and a translation ``t`` (mm), applied to the
initial geometry. Each step renders the DRR with :func:`xwin.kernels.project` (exact Siddon by default),
scores it against the target with an intensity-mapping-blind similarity
(:mod:`xwin.register.similarity`), and moves ``(ω, t)`` along the projector's analytic geometry gradient
with Adam. It runs coarse to fine: a few detector resolutions (the target average-pooled, the detector
pixels enlarged to match) and, where the enlarged pixels are much larger than a voxel, an average-pooled
CT; the pose carries over from level to level.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from xwin.errors import XwinError
from xwin.geometry import Geometry
from xwin.kernels import project
from xwin.pose import apply_pose, so3_exp, volume_center

from .similarity import similarity as _similarity

__all__ = ["RegistrationError", "RegistrationResult", "register", "detector_level", "image_level", "volume_level",
           "default_levels", "default_lm_levels", "compose", "near_axis_parallel_beam"]


class RegistrationError(XwinError):
    """Bad input to the registration (target shape, geometry, CT)."""


@dataclass
class RegistrationResult:
    """The outcome of :func:`register`.

    ``rotation`` (axis-angle, radians) and ``translation`` (mm) are the pose change applied to the initial
    geometry about ``pivot``; ``geometry`` is the initial geometry moved by it. ``losses`` holds one value
    per optimiser step (1 − similarity at that step's pose), ``level_of_step`` the pyramid level of each.

    ``status`` says how the optimiser ended, from what it knows (never from the truth): ``"converged"`` (the last
    level ended on its step tolerance or, for LM, could find no better pose within a small step; for Adam, the
    last level ran to its end with a non-zero gradient), ``"iteration_limit"`` (LM: the last level ran out of
    iterations while still moving), ``"stalled"`` (LM: large steps kept failing at the last level),
    ``"zero_gradient"`` (the pose gradient was exactly zero, so nothing moved: e.g. parallel rays along a voxel
    axis with Siddon, whose integral is piecewise constant in the pose) or ``"diverged"`` (the translation grew
    beyond half the CT's diagonal). ``converged`` is ``status == "converged"``. ``final_loss`` is the last
    accepted loss (``losses`` also holds LM's rejected trial renders). ``optimizer``/``method`` are what ran in
    the end: a Siddon run whose gradient is exactly zero at the start is redone with Adam on the trilinear
    projector (``"adam"``, ``"trilinear"``).
    """

    geometry: Geometry
    rotation: torch.Tensor
    translation: torch.Tensor
    pivot: torch.Tensor
    losses: List[float] = field(default_factory=list)
    level_of_step: List[int] = field(default_factory=list)
    levels: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    similarity: str = ""
    status: str = ""
    converged: bool = False
    final_loss: Optional[float] = None
    optimizer: str = ""
    method: str = ""

    def to_dict(self) -> dict:
        import json

        return {"geometry": json.loads(self.geometry.to_json()),
                "pose_change": {"rotation_axis_angle_rad": self.rotation.tolist(),
                                "rotation_deg": math.degrees(float(self.rotation.norm())),
                                "translation_mm": self.translation.tolist(), "pivot_mm": self.pivot.tolist(),
                                "convention": "x -> R (x - pivot) + pivot + t applied to the initial geometry; "
                                              "R = exp([rotation]x)"},
                "loss_curve": self.losses, "level_of_step": self.level_of_step, "levels": self.levels,
                "seconds": self.seconds, "similarity": self.similarity, "status": self.status,
                "converged": self.converged, "final_loss": self.final_loss, "optimizer": self.optimizer,
                "method": self.method}


# ------------------------------------------------------------------------------------------ the pyramid

def detector_level(geometry: Geometry, factor: int) -> Geometry:
    """The detector binned by ``factor`` × ``factor`` (pixels ``factor`` times larger, rows and columns cropped
    to a multiple of ``factor`` at the far end): the pixel ``(r, c)`` of the result sits at the centre of
    the block of pixels it averages in :func:`image_level`."""
    f = int(factor)
    if f == 1:
        return geometry
    rows, cols = geometry.rows // f, geometry.cols // f
    if rows < 1 or cols < 1:
        raise RegistrationError(f"detector {geometry.rows}x{geometry.cols} is smaller than the binning {f}")
    shift_c = (cols * f - geometry.cols) / 2.0
    shift_r = (rows * f - geometry.rows) / 2.0
    center = geometry.center + shift_c * geometry.u + shift_r * geometry.v
    first = geometry.source if geometry.kind == "cone" else geometry.direction
    build = Geometry.cone if geometry.kind == "cone" else Geometry.parallel
    return build(first, center, geometry.u * f, geometry.v * f, rows, cols)


def image_level(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(V, H, W) images average-pooled by ``factor`` (cropped like :func:`detector_level`)."""
    f = int(factor)
    if f == 1:
        return image
    H, W = image.shape[-2] // f * f, image.shape[-1] // f * f
    return F.avg_pool2d(image[..., :H, :W][:, None], f)[:, 0]


def volume_level(volume: torch.Tensor, affine: np.ndarray, factor: int) -> Tuple[torch.Tensor, np.ndarray]:
    """The CT average-pooled by ``factor`` per axis (cropped to a multiple at the far end) and its affine."""
    f = int(factor)
    if f == 1:
        return volume, affine
    X, Y, Z = (s // f * f for s in volume.shape)
    if min(X, Y, Z) < f:
        return volume, affine
    pooled = F.avg_pool3d(volume[None, None, :X, :Y, :Z], f)[0, 0]
    scale = np.eye(4)
    scale[:3, :3] *= f
    scale[:3, 3] = (f - 1) / 2.0
    return pooled.contiguous(), np.asarray(affine, dtype=np.float64) @ scale


def _pixel_at_pivot(geometry: Geometry, pivot: torch.Tensor) -> float:
    """The detector pixel's width projected back to the pivot's depth (mm), for the first view."""
    px = float(geometry.u[0].norm())
    if geometry.kind != "cone":
        return px
    s, c = geometry.source[0], geometry.center[0]
    n = torch.linalg.cross(geometry.u[0], geometry.v[0])
    n = n / n.norm()
    return px * abs(float(((pivot - s) * n).sum())) / max(abs(float(((c - s) * n).sum())), 1e-9)


def default_levels(cols: int, sizes: Sequence[int] = (32, 64, 128), iterations: Sequence[int] = (80, 50, 30)):
    """(detector binning, iterations) per level: detectors about ``sizes`` pixels wide, capped by ``cols``."""
    out = []
    for size, it in zip(sizes, iterations):
        f = max(1, int(round(cols / size)))
        if out and out[-1][0] == f:
            continue
        out.append((f, it))
    return out


def default_lm_levels(cols: int, sizes: Sequence[int] = (8, 16, 64, 1 << 30), iterations: Sequence[int] = (10, 15, 8, 25)):
    """The Levenberg–Marquardt optimiser's levels: comparisons about 8, 16 and 64 pixels wide (the DRR rendered at
    ``LM_RENDER_COLS`` or more and pooled), then the full detector; at most 10, 15, 8 and 12 iterations. Sizes
    that give the same binning merge into one level with the larger iteration budget."""
    out = {}
    for size, it in zip(sizes, iterations):
        f = max(1, int(round(cols / size)))
        out[f] = max(it, out.get(f, 0))
    return sorted(out.items(), key=lambda p: -p[0])


# ------------------------------------------------------------------------------------------ registration

def _check_target(target, geometry: Geometry) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(np.asarray(target))
    t = target.detach().to(torch.float32)
    want = (geometry.num_views, geometry.rows, geometry.cols)
    if t.ndim == 2:
        t = t[None]
    if tuple(t.shape) != want:
        shape = "x".join(str(s) for s in target.shape)
        raise RegistrationError(f"the target is {shape} but the geometry's detector is {geometry.rows}x{geometry.cols}"
                                + (f" with {geometry.num_views} views" if geometry.num_views > 1 else ""))
    if not torch.isfinite(t).all():
        raise RegistrationError("the target image contains NaN or Inf")
    return t


def register(volume: torch.Tensor, target, init: Geometry, *, affine=None, levels: Optional[Sequence] = None,
             similarity: str = "ncc+gncc", method: str = "siddon", optimizer: str = "auto",
             lr_rotation_deg: float = 1.0, lr_translation_mm: float = 2.0, pivot=None, progress: bool = False,
             patience: int = 15, callback: Optional[Callable[[int, int, float], None]] = None) -> RegistrationResult:
    """Find the rigid pose change of ``init`` whose DRR of ``volume`` best matches ``target``.

    Args:
        volume: (X, Y, Z) attenuation volume (e.g. μ in 1/mm), indexed like nibabel's ``get_fdata()``.
        target: (rows, cols) image, or (V, rows, cols) for a V-view geometry: line integrals or intensities
            (any roughly affine, increasing map of line integrals: "bright = dense").
        init: the initial geometry (world mm of the CT's frame).
        affine: the CT's voxel → world affine (4, 4); default identity.
        levels: ``[(detector binning, iterations), ...]`` coarse to fine; default :func:`default_levels`
            (Adam) or :func:`xwin.register.lm.default_lm_levels` (Levenberg–Marquardt).
        similarity: ``"ncc+gncc"`` (default: half global NCC, half gradient NCC), ``"ncc"``, ``"gncc"``,
            ``"mncc"`` (multiscale patch NCC).
        method: projector method, ``"siddon"`` (exact) or ``"trilinear"``.
        optimizer: ``"lm"`` (Levenberg–Marquardt on the pixel Jacobian, :mod:`xwin.register.lm`; Siddon and
            the NCC/gradient-NCC similarities only), ``"adam"``, or ``"auto"`` (``"lm"`` where it applies). A
            parallel beam close to a voxel axis (:func:`near_axis_parallel_beam`) runs Adam even for ``"lm"``, and a
            Siddon gradient that is zero at the start reruns with Adam on the trilinear projector; the result's
            ``optimizer`` and ``method`` say what ran.
        lr_rotation_deg, lr_translation_mm: Adam step sizes at the first level (halved at every level,
            cosine-decayed to a tenth within a level).
        pivot: rotation centre (3,) world mm; default the CT's centre.
        progress: show a tqdm progress bar.
        patience: Adam leaves a level after this many steps without a better loss (not before 2 × patience steps).
        callback: called as ``callback(step, level, loss)`` after every step (every render for LM).
    """
    t_start = time.perf_counter()
    if not isinstance(init, Geometry):
        raise RegistrationError(f"init must be an xwin.geometry.Geometry, got {type(init).__name__}")
    if not isinstance(volume, torch.Tensor) or volume.ndim != 3:
        raise RegistrationError("volume must be an (X, Y, Z) tensor")
    sim = _similarity(similarity)
    use_lm = resolve_optimizer(optimizer, method, similarity) == "lm"
    tgt = _check_target(target, init).to(volume.device)
    init = init.detach()
    A = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    piv = volume_center(volume.shape, A) if pivot is None else torch.as_tensor(pivot, dtype=torch.float64).reshape(3)
    levels_default = levels is None
    if levels is None:
        levels = default_lm_levels(init.cols) if use_lm else default_levels(init.cols)
    levels = [(int(f), int(it)) for f, it in levels]
    vol = volume.detach().to(torch.float32).contiguous()
    if use_lm and near_axis_parallel_beam(init, A, volume.shape):
        # LM's exact Siddon Jacobian only predicts sub-voxel moves here (see near_axis_parallel_beam): Adam instead
        use_lm = False
        levels = default_levels(init.cols) if levels_default else levels
    run = _run_lm if use_lm else _run_adam
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(it for _, it in levels), desc="registering", dynamic_ncols=True)
    log = _Log(bar, callback, len(levels))
    opt_name = "lm" if use_lm else "adam"
    try:
        omega, trans, status = run(vol, A, tgt, init, piv, levels, log, similarity=similarity, sim=sim, method=method,
                                   lr=(lr_rotation_deg, lr_translation_mm), patience=patience)
        if status == "zero_gradient" and method == "siddon":
            # Siddon's integral is piecewise constant in the pose where every ray runs along voxel planes (e.g. a
            # parallel beam along a voxel axis): its exact derivative is 0 and nothing moves. The trilinear
            # projector's is not: redo the run with Adam on it (the similarity is the same; LM needs Siddon)
            opt_name, method = "adam", "trilinear"
            if use_lm:
                levels = default_levels(init.cols)
            log.restart(len(levels))
            omega, trans, status = _run_adam(vol, A, tgt, init, piv, levels, log, sim=sim, method=method,
                                             lr=(lr_rotation_deg, lr_translation_mm), patience=patience)
    finally:
        if bar is not None:
            bar.close()
    radius = _half_diagonal(volume.shape, A)
    if not (math.isfinite(float(trans.norm())) and float(trans.norm()) <= radius and bool(torch.isfinite(omega).all())):
        status = "diverged"
    with torch.no_grad():
        final = apply_pose(init, omega, trans, piv)
    return RegistrationResult(geometry=final, rotation=omega, translation=trans, pivot=piv, losses=log.losses,
                              level_of_step=log.level_of, levels=log.info, seconds=time.perf_counter() - t_start,
                              similarity=similarity, status=status, converged=status == "converged",
                              final_loss=log.info[-1]["final_loss"] if log.info else None, optimizer=opt_name,
                              method=method)


#: a parallel beam whose rays cross fewer than this many voxel planes of some index axis (the beam's major axis
#: aside) over the CT counts as near-axis-aligned
NEAR_AXIS_CROSSINGS = 2.0


def near_axis_parallel_beam(geometry: Geometry, affine, shape) -> bool:
    """Whether a parallel beam runs so close to a voxel axis that its rays cross fewer than
    ``NEAR_AXIS_CROSSINGS`` planes of another index axis through the whole CT (any view).

    There Siddon's integral, as a function of the pose, is piecewise linear with kinks a small fraction of a
    voxel apart (a ray flips from one voxel column to the next), and its exact derivative — large, ``Δμ / w⊥`` —
    predicts only sub-voxel moves: Levenberg–Marquardt's Gauss–Newton steps are rejected or shrink to nothing
    far from the truth (measured: 5.9° off from a 6.9° start on 8×9×12 mm voxels), while Adam, whose momentum
    averages the derivative over many steps, registers. :func:`register` uses Adam for such geometries."""
    if geometry.kind != "parallel":
        return False
    minv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    e = np.abs(geometry.direction.detach().cpu().numpy() @ minv.T)             # index steps per mm, per view
    major = e.argmax(1)
    n_major = np.asarray(shape, dtype=np.float64)[major]
    crossings = e / e.max(1, keepdims=True) * n_major[:, None]
    crossings[np.arange(len(major)), major] = np.inf
    return bool((crossings < NEAR_AXIS_CROSSINGS).any())


def resolve_optimizer(optimizer: str, method: str, similarity: str) -> str:
    """``"lm"`` or ``"adam"`` for ``register``'s ``optimizer`` argument (``"auto"``: LM for Siddon and a
    similarity of the NCC family, else Adam); a :class:`RegistrationError` for a choice that cannot run."""
    from .lm import LEAST_SQUARES

    if optimizer not in ("auto", "lm", "adam"):
        raise RegistrationError(f"optimizer must be 'auto', 'lm' or 'adam', got {optimizer!r}")
    lm_ok = method == "siddon" and similarity in LEAST_SQUARES
    if optimizer == "lm" and not lm_ok:
        raise RegistrationError(f"optimizer 'lm' needs method 'siddon' and a similarity in {sorted(LEAST_SQUARES)}")
    return "lm" if optimizer == "lm" or (optimizer == "auto" and lm_ok) else "adam"


class _Log:
    """Loss curve, progress bar and callback, shared by both optimisers."""

    def __init__(self, bar, callback, n_levels):
        self.bar, self.callback, self.n_levels = bar, callback, n_levels
        self.losses, self.level_of, self.info = [], [], []
        self.level = 0

    def step(self, loss: float):
        self.losses.append(loss)
        self.level_of.append(self.level)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(level=f"{self.level + 1}/{self.n_levels}", loss=f"{loss:.4f}")
        if self.callback is not None:
            self.callback(len(self.losses), self.level, loss)

    def end_level(self, budget: int, done: int, final_loss=None, **info):
        if self.bar is not None and done < budget:
            self.bar.update(budget - done)
        if final_loss is None:
            final_loss = self.losses[-1] if self.losses else None
        self.info.append(dict(info, steps=done, final_loss=final_loss))
        self.level += 1

    def restart(self, n_levels: int):
        """A second run (the fallback) continues the loss curve; its levels are numbered after the first's."""
        self.n_levels = self.level + n_levels


def _half_diagonal(shape, A) -> float:
    """Half the CT's diagonal (mm)."""
    return 0.5 * float(np.linalg.norm(np.linalg.norm(np.asarray(A)[:3, :3], axis=0) * np.asarray(shape)))


#: a loss gradient this small (loss change over moving the CT's half-diagonal, or one radian) counts as exactly zero
ZERO_GRADIENT = 1e-6


def _ct_pooling(g_l: Geometry, piv, min_spacing: float) -> int:
    """How much to pool the CT for a level: where the level's pixels are several voxels wide at the pivot."""
    return max(1, min(4, int(_pixel_at_pivot(g_l, piv) / min_spacing)))


def _run_adam(vol, A, tgt, init, piv, levels, log, *, sim, method, lr, patience, **_):
    min_spacing = float(np.linalg.norm(A[:3, :3], axis=0).min())
    radius = _half_diagonal(vol.shape, A)
    w_deg = torch.zeros(3, dtype=torch.float64, requires_grad=True)    # ω in degrees (axis-angle)
    t_mm = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    moved = False
    for li, (factor, iters) in enumerate(levels):
        g_l = detector_level(init, factor)
        t_l = image_level(tgt, factor)
        # a pooled CT where the level's pixels are several voxels wide; the full CT at the last level
        vfac = 1 if li == len(levels) - 1 else _ct_pooling(g_l, piv, min_spacing)
        vol_l, aff_l = volume_level(vol, A, vfac)
        base = (lr[0] * 0.5 ** li, lr[1] * 0.5 ** li)
        opt = torch.optim.Adam([{"params": [w_deg], "lr": base[0]}, {"params": [t_mm], "lr": base[1]}])
        best, since, done = math.inf, 0, 0
        for k in range(iters):
            decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / max(iters, 1)))
            for group, b in zip(opt.param_groups, base):
                group["lr"] = b * decay
            opt.zero_grad()
            g = apply_pose(g_l, torch.deg2rad(w_deg), t_mm, piv)
            drr = project(vol_l, g, affine=aff_l, method=method, check_finite=False)
            loss = 1.0 - sim(drr, t_l)
            loss.backward()
            moved = moved or float(t_mm.grad.norm()) * radius + float(w_deg.grad.norm()) * 180 / math.pi > ZERO_GRADIENT
            opt.step()
            lv = float(loss.detach())
            log.step(lv)
            done += 1
            if not moved:
                break
            if lv < best - 1e-6:
                best, since = lv, 0
            else:
                since += 1
                if since >= patience and k >= 2 * patience:
                    break
        log.end_level(iters, done, detector_binning=factor, detector=[g_l.rows, g_l.cols], ct_pooling=vfac)
        if not moved:
            break                                   # a zero gradient at the start: Adam's pose would never move
    return torch.deg2rad(w_deg.detach()), t_mm.detach().clone(), "converged" if moved else "zero_gradient"


#: the LM renders at least this many detector columns (or the whole detector) and pools to the level's size
LM_RENDER_COLS = 64
#: LM tolerances (a kept step smaller than both ends a level): coarse levels, last level
LM_TOL = ((0.05, 0.05), (0.01, 0.02))
#: LM's last level ending on rejected steps counts as converged when the last step it tried was at most this (mm)
LM_STALL_STEP_MM = 0.25


def _run_lm(vol, A, tgt, init, piv, levels, log, *, similarity, **_):
    from xwin.pose import so3_log

    from .lm import lm_level

    max_spacing = float(np.linalg.norm(A[:3, :3], axis=0).max())
    radius = _half_diagonal(vol.shape, A)
    R, t = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    cap = max(1, int(round(init.cols / LM_RENDER_COLS)))
    for li, (factor, iters) in enumerate(levels):
        last = li == len(levels) - 1
        render = max(d for d in range(1, min(factor, cap) + 1) if factor % d == 0)
        g_r = detector_level(init, render)
        pool = factor // render
        if last:
            # compare no finer than a voxel: where pixels (at the pivot) are smaller than the CT's voxels, the
            # DRR is a staircase of voxel blocks and the gradient NCC of its edges has spurious minima
            pool *= max(1, min(4, math.ceil(max_spacing / _pixel_at_pivot(g_r, piv) - 1e-6)))
        t_l = image_level(tgt, render * pool)
        # the CT pooled 2x where the comparison pools the render 4x or more and its pixels (at the pivot) span 3 or
        # more of the CT's largest voxel steps, else the full CT (a coarse CT is never pooled further)
        vfac = 1 if last or pool < 4 or _pixel_at_pivot(detector_level(init, factor), piv) < 3 * max_spacing else 2
        vol_l, aff_l = volume_level(vol, A, vfac)
        tol = LM_TOL[1] if last else LM_TOL[0]
        rep = {}
        R, t, losses, _ = lm_level(vol_l, torch.as_tensor(aff_l, dtype=torch.float64), g_r, t_l, R, t, piv,
                                   similarity=similarity, pool=pool, iterations=iters, tol_deg=tol[0],
                                   tol_mm=tol[1], on_render=log.step, radius=radius, report=rep)
        log.end_level(iters, len(losses), final_loss=rep["loss"], detector_binning=render * pool,
                      detector=[t_l.shape[-2], t_l.shape[-1]], rendered=[g_r.rows, g_r.cols], ct_pooling=vfac, end=rep["end"])
        if rep["end"] == "no_gradient" and li == 0:
            return so3_log(R), t, "zero_gradient"
    # how the last level ended: its step tolerance, or rejections of steps already as small as a few times the
    # tolerance (no better pose nearby), count as converged
    status = {"tolerance": "converged", "iterations": "iteration_limit", "no_gradient": "zero_gradient"}.get(rep["end"])
    if status is None:
        status = "converged" if rep["last_step"] <= LM_STALL_STEP_MM else "stalled"
    return so3_log(R), t, status


def compose(pose_a: Tuple[torch.Tensor, torch.Tensor], pose_b: Tuple[torch.Tensor, torch.Tensor]):
    """The pose "a then b" (both about the same pivot): ``(R_b R_a, R_b t_a + t_b)`` as (axis-angle, t)."""
    from xwin.pose import so3_log

    Ra, Rb = so3_exp(pose_a[0]), so3_exp(pose_b[0])
    return so3_log(Rb @ Ra), Rb @ torch.as_tensor(pose_a[1], dtype=torch.float64) + torch.as_tensor(pose_b[1],
                                                                                                  dtype=torch.float64)
