"""Filtered backprojection: FDK for cone beam, FBP for parallel beam, on any circular orbit.

Pipeline (Feldkamp, Davis & Kress 1984; Kak & Slaney ch. 3 for the discrete scaling; Parker 1982):

1. **Orbit.** The per-view vectors of the :class:`~xwin.geometry.Geometry` are fitted with a circle
   (cone beam: the source positions; parallel beam: the ray directions on the unit sphere). That gives the
   rotation axis, the radius ``D`` (source–axis distance) and the angle ``β`` of every view. FDK is derived
   for a circular orbit; a geometry that is not one (residual above 0.1 % of ``D``) gets a warning and an
   approximate result.
2. **Pre-weights.** Cone beam: each pixel is multiplied by ``cos`` of its ray's angle to the central ray,
   ``SDD / |P − S|``. Redundancy: a full 2π scan measures every line twice, weight ½; a short scan gets
   Parker weights with the overscan generalisation (the fan half-angle ``δ`` is replaced by
   ``(span − π)/2``), computed from each column's in-plane fan angle. Parallel beam: views θ and θ + π
   measure the same lines, so the view angles are folded onto [0, π) and each view's angular weight is
   half the gap to its neighbours there — any set of views (180°, 360°, 270°, uneven) is weighted so that
   every line counts once. An arc shorter than ``π + 2δ`` (``π`` for parallel) cannot be reconstructed
   exactly: warned, and done as well as the data allow.
3. **Ramp filter** along the detector rows (the ``u`` direction): FFT with zero padding to at least twice the row
   length (the next 5-smooth length for plain Ram-Lak, a power of two with another window or a cutoff),
   the DFT of the *spatially sampled* Ram-Lak kernel (no DC error) times a window (Ram-Lak, Shepp-Logan,
   cosine, Hamming, Hann) with a cutoff as a fraction of Nyquist.
4. **Scale.** Per view ``Δβ · D · SDD / du`` (cone) or ``Δβ / du`` (parallel), with ``du`` the column
   pitch (perpendicular to the rays for parallel beam); the backprojection divides by ``w²`` (``w`` the
   source–voxel distance along the central ray), so a uniform object reconstructs to its μ.
5. **Backprojection**: voxel-driven, bilinear, :mod:`xwin.kernels.fdk_backproject` (Triton on CUDA; on the
   CPU a separable path when the rotation axis is a volume axis, the general ``grid_sample`` one otherwise).

Assumptions (as in every FDK implementation): the detector rows are parallel to the orbit plane (``u`` is
along the orbit's tangent) and the detector faces the source; tilted detectors would need rebinning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from xwin.geometry import Geometry
from xwin.kernels.fdk_backproject import fdk_backproject, view_matrices
from xwin.errors import XwinError

__all__ = ["FILTERS", "ReconstructionError", "ramp_response", "ramp_filter", "Orbit", "fit_orbit",
           "parker_weights", "fdk_weights", "fdk", "fbp", "fov_mask"]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")
_FILTER_BLOCK = 1 << 21       # detector pixels filtered at once (pre-weighting + FFT temporaries)


class ReconstructionError(XwinError):
    """Bad input to a reconstruction (shapes, geometry, options)."""


# ---------------------------------------------------------------------------------------- ramp filter

def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def ramp_response(n_pad: int, window: str = "ram-lak", cutoff: float = 1.0) -> torch.Tensor:
    """Real frequency response (n_pad//2 + 1,) float64 of the windowed ramp filter for unit pixel pitch.

    It is the DFT of the spatially sampled Ram-Lak kernel ``h[0] = 1/4``, ``h[k odd] = −1/(πk)²``,
    ``h[k even] = 0`` (Kak & Slaney eq. 3.61 with τ = 1), times the window; ``cutoff`` ∈ (0, 1] is the
    fraction of the Nyquist frequency above which the response is zero.
    """
    if window not in FILTERS:
        raise ReconstructionError(f"filter must be one of {FILTERS}, got {window!r}")
    if not (0 < cutoff <= 1):
        raise ReconstructionError(f"filter cutoff must be in (0, 1], got {cutoff}")
    k = torch.arange(n_pad, dtype=torch.float64)
    k = torch.where(k > n_pad // 2, k - n_pad, k)                  # circular (signed) offsets
    h = torch.zeros(n_pad, dtype=torch.float64)
    h[0] = 0.25
    odd = (k.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    H = torch.fft.rfft(h).real
    x = torch.arange(H.numel(), dtype=torch.float64) / (n_pad / 2.0)   # frequency / Nyquist, in [0, 1]
    xc = x / cutoff
    if window == "ram-lak":
        win = torch.ones_like(x)
    elif window == "shepp-logan":
        a = math.pi * xc / 2
        win = torch.where(a > 0, torch.sin(a) / torch.where(a > 0, a, torch.ones_like(a)), torch.ones_like(a))
    elif window == "cosine":
        win = torch.cos(math.pi * xc / 2)
    elif window == "hamming":
        win = 0.54 + 0.46 * torch.cos(math.pi * xc)
    else:  # hann
        win = 0.5 + 0.5 * torch.cos(math.pi * xc)
    win = torch.where(xc <= 1.0, win, torch.zeros_like(win))
    return H * win


def _next_smooth(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n (a size the FFT handles fast)."""
    best = _next_pow2(n)
    f5 = 1
    while f5 < best:
        f35 = f5
        while f35 < best:
            m = f35
            while m < n:
                m *= 2
            best = min(best, m)
            f35 *= 3
        f5 *= 5
    return best


def ramp_filter(p: torch.Tensor, window: str = "ram-lak", cutoff: float = 1.0) -> torch.Tensor:
    """Filter every detector row (last axis) with the windowed ramp (unit pixel pitch), zero padded.

    The zero padding is at least the row length, so the circular convolution is the linear one. With a
    window (or a cutoff) the padded length is a power of two (≥ 64), which fixes the sampled window; the
    plain Ram-Lak filter is the sampled kernel itself, the same for any padded length ≥ 2n, so it takes the
    next 5-smooth length instead (216 rather than 256 for 102 columns: a faster FFT, the same result)."""
    n = p.shape[-1]
    n_pad = max(64, _next_pow2(2 * n))
    if window == "ram-lak" and cutoff == 1.0:
        n_pad = _next_smooth(2 * n)
    H = ramp_response(n_pad, window, cutoff).to(device=p.device, dtype=p.dtype)
    F = torch.fft.rfft(p, n=n_pad, dim=-1)
    return torch.fft.irfft(F * H, n=n_pad, dim=-1)[..., :n]


# ---------------------------------------------------------------------------------------- orbit

@dataclass
class Orbit:
    """Circular orbit fitted to a geometry (float64 numpy)."""

    angles: np.ndarray        # (V,) view angles β (radians, unwrapped in view order, increasing)
    center: np.ndarray        # (3,) centre of the orbit circle (cone) / origin (parallel)
    axis: np.ndarray          # (3,) unit rotation axis (right-handed with increasing β)
    e1: np.ndarray            # (3,) in-plane basis: β measured from e1 towards e2
    e2: np.ndarray
    radius: float             # source–axis distance D in mm (cone), 1 (parallel)
    residual: float           # max deviation from the circle, relative to the radius
    full_scan: bool           # views cover the circle (2π; π for parallel beam) without a gap
    span: float               # arc covered (radians; on the folded [0, π) circle for parallel beam)
    start: float              # angle where a short scan starts (radians)
    dbeta: np.ndarray         # (V,) angular weight of every view (radians; they add up to the span)


def fit_orbit(geometry: Geometry) -> Orbit:
    """Fit a circular orbit to the sources (cone) or ray directions (parallel) of ``geometry``."""
    g = geometry.to("cpu")
    V = g.num_views
    if V < 3:
        raise ReconstructionError(f"filtered backprojection needs at least 3 views on an orbit, got {V}")
    if g.kind == "cone":
        pts = g.source.numpy()
        m = pts.mean(0)
    else:
        d = g.direction.numpy()
        pts = d / np.linalg.norm(d, axis=1, keepdims=True)
        m = np.zeros(3)
    _, s, vt = np.linalg.svd(pts - m, full_matrices=False)
    if s[1] <= 1e-9 * max(s[0], 1e-300):
        raise ReconstructionError("the views lie on a line, not on a circular orbit: cannot do FDK/FBP")
    e1, e2, axis = vt[0], vt[1], vt[2]
    x = (pts - m) @ e1
    y = (pts - m) @ e2
    if g.kind == "cone":
        # algebraic circle fit (Kasa): x² + y² = 2ax + 2by + c
        Am = np.stack([2 * x, 2 * y, np.ones_like(x)], 1)
        a, b, c = np.linalg.lstsq(Am, x * x + y * y, rcond=None)[0]
        radius = float(math.sqrt(max(c + a * a + b * b, 0.0)))
        center = m + a * e1 + b * e2
        xc, yc = x - a, y - b
        off_plane = np.abs((pts - m) @ axis).max()
        residual = float(max(np.abs(np.hypot(xc, yc) - radius).max(), off_plane) / radius)
    else:
        center = np.zeros(3)
        xc, yc = x, y
        radius = 1.0
        residual = float(np.abs(pts @ axis).max())
    beta = np.unwrap(np.arctan2(yc, xc))
    if beta[-1] < beta[0]:                       # make the angles increase with the view order
        e2 = -e2
        beta = np.unwrap(np.arctan2(-yc, xc))
    axis = np.cross(e1, e2)                      # right-handed: β turns about +axis
    if residual > 1e-3:
        warnings.warn(f"the geometry is not a circular orbit (relative residual {residual:.2g}); FDK/FBP assume "
                      f"one, so the reconstruction is approximate", stacklevel=3)
    # coverage: sort the angles on the circle and look at the gaps. Parallel beam: the views θ and θ + π
    # measure the same lines, so the angles live on a circle of period π and a 2π scan just has every
    # angle twice (gaps of 0); the per-view weights below then compensate any angular density.
    period = 2 * math.pi if g.kind == "cone" else math.pi
    b = np.mod(beta - beta[0], period)
    order = np.argsort(b, kind="stable")
    bs = b[order]
    gaps = np.diff(np.concatenate([bs, [bs[0] + period]]))             # gap after each sorted view
    gmax_i = int(np.argmax(gaps))
    if g.kind == "cone":
        full = gaps[gmax_i] <= 1.5 * float(np.median(gaps)) + 1e-12
    else:
        full = gaps[gmax_i] <= 4.0 * period / V + 1e-12
    dbeta = np.empty(V)
    if full:
        prev = np.roll(gaps, 1)
        dbeta[order] = 0.5 * (gaps + prev)
        span, start = period, float(beta[0])
    else:
        # the scan runs from the view after the biggest gap round to the view before it
        ro = np.roll(order, -(gmax_i + 1))
        start_b = b[ro[0]]
        rel = np.mod(b[ro] - start_b, period)
        span = float(rel[-1])
        inner = np.diff(rel)
        dd = np.zeros(V)
        dd[:-1] += 0.5 * inner
        dd[1:] += 0.5 * inner
        dbeta[ro] = dd
        start = float(beta[0] + start_b)
    return Orbit(angles=beta, center=center, axis=axis, e1=e1, e2=e2, radius=radius, residual=residual,
                 full_scan=bool(full), span=span, start=start, dbeta=dbeta)


def parker_weights(beta: np.ndarray, gamma: np.ndarray, span: float) -> np.ndarray:
    """Parker's short-scan weights with overscan: ``beta`` (V, 1) in [0, span], ``gamma`` (V, cols) fan angle
    in Parker's sign convention (the conjugate of ray (β, γ) is (β + π + 2γ, −γ)). ``δ = (span − π)/2``.

    For every pair of conjugate rays inside the scan the two weights add up to 1.
    """
    d = max((span - math.pi) / 2.0, 1e-9)
    g = np.clip(gamma, -d + 1e-12, d - 1e-12)
    b = np.broadcast_to(beta, g.shape)
    w = np.ones_like(g)
    lo = b < 2 * (d - g)
    hi = b > math.pi - 2 * g
    w = np.where(lo, np.sin(math.pi / 4 * b / (d - g)) ** 2, w)
    w = np.where(hi, np.sin(math.pi / 4 * np.clip(math.pi + 2 * d - b, 0, None) / (d + g)) ** 2, w)
    return w


def _displaced_overlap(gamma: np.ndarray) -> Optional[float]:
    """Half-width θ (radians) of the fan angles every view measures on both sides of the central ray when the
    detector is displaced sideways (RTK's DisplacedDetectorImageFilter test: |γ_lo + γ_hi| ≥ 0.1 (γ_hi − γ_lo)
    with γ_lo the largest first-column and γ_hi the smallest last-column fan angle over the views); None
    for a centred detector. Negative when the detector extends further on the negative side. A detector that
    does not reach the central ray cannot be weighted."""
    lo = float(np.max(gamma.min(1)))
    hi = float(np.min(gamma.max(1)))
    if abs(lo + hi) < 0.1 * abs(hi - lo):
        return None
    if lo > 0 or hi < 0:
        raise ReconstructionError(
            f"the detector is displaced by more than half its width (fan angles {math.degrees(lo):.2f} .. "
            f"{math.degrees(hi):.2f} deg do not include the central ray): no redundancy weighting can fill the gap")
    return min(-lo, hi) * (1.0 if lo + hi > 0 else -1.0)


def displaced_detector_weights(gamma: np.ndarray, theta: float) -> np.ndarray:
    """Redundancy weights of a full 360° scan with a sideways-displaced (half-fan) detector.

    ``gamma`` (V, cols) fan angles, ``theta`` the overlap half-width, negative if the detector extends further
    towards negative fan angles. Rays measured once (beyond the overlap
    on the long side) weigh 1, their missing conjugates 0, and across the overlap the weight rises as
    ½(1 + sin(π/2 · γ/θ)) so that every pair of conjugate rays (γ, −γ) adds up to 1 - RTK's
    DisplacedDetectorImageFilter (its weights are twice these, its full-scan normalisation half ours).
    """
    t = np.clip(gamma / theta, -1.0, 1.0)                               # positive towards the long side
    return 0.5 * (1.0 + np.sin(0.5 * math.pi * t))


def fdk_weights(geometry: Geometry, orbit: Optional[Orbit] = None, measured: Optional[slice] = None):
    """Everything FDK multiplies the raw projections by, as float64 tensors.

    Returns ``(pre, scale, info)``: ``pre`` (V, rows, cols) = cosine pre-weight × redundancy weight, applied
    before filtering; ``scale`` (V,) = Δβ·D·SDD/du (cone) or Δβ/du (parallel), applied after filtering (the
    filter works in pixel units); ``info`` a dict describing the orbit for the metrics file. ``measured``:
    the columns that hold data when the stack was padded (:func:`pad_displaced_detector`).
    """
    cosine, red, scale, info = _fdk_factors(geometry, orbit, measured)
    pre = cosine(slice(None))
    pre *= red[:, None, :]
    return torch.from_numpy(pre), torch.from_numpy(np.asarray(scale, dtype=np.float64)), info


def _fdk_factors(geometry: Geometry, orbit: Optional[Orbit] = None, measured: Optional[slice] = None):
    """:func:`fdk_weights` in factors: ``(cosine, red, scale, info)`` with ``cosine(views)`` the cosine
    pre-weights (n, rows, cols) of a slice of views (computed on demand: fdk() weights blocks of views) and
    ``red`` (V, cols) the redundancy weights, float64 numpy."""
    g = geometry.to("cpu")
    o = orbit or fit_orbit(g)
    V, R, C = g.num_views, g.rows, g.cols
    u, v = g.u.numpy(), g.v.numpy()
    n = np.cross(u, v)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    if g.kind == "cone":
        S = g.source.numpy()
        n *= np.sign(((g.center.numpy() - S) * n).sum(1))[:, None]
        sdd = ((g.center.numpy() - S) * n).sum(1)                      # (V,)
        # in-plane fan angle of every column (through the principal point's row)
        F = S + sdd[:, None] * n
        rowF = np.clip(np.round(((F - g.center.numpy()) * v).sum(1) / (v * v).sum(1) + (R - 1) / 2), 0, R - 1)
        # pixel (r, c) - source = d0 + a·u + b·v (a, b: offsets from the detector centre in pixels), so
        # |P - S|² = |d0 + a·u|² + b²|v|² + 2b·v·(d0 + a·u): per-column and per-row terms plus one product,
        # without forming (V, R, C, 3) positions
        a = np.arange(C) - (C - 1) / 2.0
        b = np.arange(R) - (R - 1) / 2.0
        dcol = (g.center.numpy() - S)[:, None, :] + a[None, :, None] * u[:, None, :]          # (V, C, 3)
        col_v, col_sq, row_sq = (dcol * v[:, None, :]).sum(-1), (dcol * dcol).sum(-1), (v * v).sum(1)

        def cosine(views):
            cosw = (2.0 * b)[None, :, None] * col_v[views, None, :]                  # (n, R, C), in place:
            cosw += col_sq[views, None, :]                                           # |P - S|²
            cosw += (b * b)[None, :, None] * row_sq[views, None, None]
            np.sqrt(cosw, out=cosw)
            return np.divide(sdd[views, None, None], cosw, out=cosw)
        dvec = dcol + (rowF - (R - 1) / 2.0)[:, None, None] * v[:, None, :]               # principal row - S
        phi = np.arctan2(dvec @ o.e2, dvec @ o.e1)                     # (V, C)
        gamma_ours = np.angle(np.exp(1j * (o.angles[:, None] + math.pi - phi)))
        du = np.linalg.norm(u, axis=1)
        scale = o.dbeta * o.radius * sdd / du
        fan = float(np.abs(gamma_ours).max())
    else:
        d = g.direction.numpy()
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        def cosine(views):
            return np.ones((len(range(V)[views]), R, C))
        gamma_ours = np.zeros((V, C))
        u_perp = u - (u * d).sum(1, keepdims=True) * d
        du = np.linalg.norm(u_perp, axis=1)
        scale = o.dbeta / du
        sdd = None
        fan = 0.0
    if g.kind == "parallel":
        # angles folded onto [0, π): the per-view Δθ already share every line among the views measuring it
        red = np.ones((V, C))
        kind = "parallel beam: angular weights on [0, pi) (each line weighted once)"
        if not o.full_scan:
            warnings.warn(f"the views cover only {math.degrees(o.span):.1f} of the 180 deg a parallel-beam scan "
                          f"needs: the data are incomplete and the reconstruction has limited-angle artefacts",
                          stacklevel=3)
            kind = "parallel beam, limited angle (weight 1)"
    elif o.full_scan:
        theta = _displaced_overlap(gamma_ours if measured is None else gamma_ours[:, measured])
        if theta is None:
            red = np.full((V, C), 0.5)
            kind = "full scan (weight 1/2)"
        else:
            red = displaced_detector_weights(gamma_ours, theta)
            kind = (f"full scan, displaced (offset) detector: half-fan weights over the overlap "
                    f"+-{math.degrees(abs(theta)):.2f} deg")
    else:
        needed = math.pi + 2 * fan
        if o.span < needed - 1e-6:
            warnings.warn(f"the arc ({math.degrees(o.span):.1f} deg) is shorter than pi + fan angle "
                          f"({math.degrees(needed):.1f} deg): the data are incomplete and the reconstruction "
                          f"has limited-angle artefacts", stacklevel=3)
        if o.span <= math.pi + 1e-9:
            red = np.ones((V, C))
            kind = "limited angle (no redundancy, weight 1)"
        else:
            rel = np.mod(o.angles - o.start, 2 * math.pi)
            rel = np.where(rel > o.span + 1e-9, rel - 2 * math.pi, rel)[:, None]
            red = parker_weights(rel, -gamma_ours, o.span)
            kind = f"short scan, Parker weights (delta = {math.degrees((o.span - math.pi) / 2):.2f} deg)"
    info = {"orbit": {"radius_mm": o.radius if g.kind == "cone" else None, "center": o.center.tolist(),
                      "axis": o.axis.tolist(), "span_deg": math.degrees(o.span), "full_scan": o.full_scan,
                      "fan_half_angle_deg": math.degrees(fan), "residual": o.residual,
                      "redundancy": kind}}
    return cosine, red, np.asarray(scale, dtype=np.float64), info


# ---------------------------------------------------------------------------------------- FDK / FBP

def fdk(projections: torch.Tensor, geometry: Geometry, volume_shape: Sequence[int], *, affine=None,
        filter: str = "ram-lak", cutoff: float = 1.0, backend: str = "auto", progress=None,
        return_info: bool = False):
    """FDK (cone beam) or FBP (parallel beam) reconstruction of line integrals on a circular orbit.

    Args:
        projections: (V, rows, cols) or (B, V, rows, cols) line integrals (e.g. from ``xwin.kernels.project``
            of a μ volume in 1/mm with an affine in mm: then the result is μ in 1/mm).
        geometry: the scan's :class:`~xwin.geometry.Geometry` (a circular orbit, full or short scan).
        volume_shape: (X, Y, Z) of the output grid; ``affine`` its voxel → world map (default identity).
        filter: one of :data:`FILTERS`; ``cutoff``: fraction of Nyquist kept.
        backend: "auto" (Triton kernel for CUDA tensors, torch reference otherwise), "triton", "torch".
        progress: optional callable ``progress(n_views_done)`` (e.g. a tqdm ``update``).

    Returns:
        (X, Y, Z) or (B, X, Y, Z) reconstruction in the projections' dtype (float32 unless float64 given);
        with ``return_info=True`` also a dict describing the orbit and weights.
    """
    if not isinstance(projections, torch.Tensor):
        raise ReconstructionError(f"projections must be a torch.Tensor, got {type(projections).__name__}")
    if not isinstance(geometry, Geometry):
        raise ReconstructionError(f"geometry must be an xwin.geometry.Geometry, got {type(geometry).__name__}")
    if projections.ndim not in (3, 4) or tuple(projections.shape[-3:]) != (geometry.num_views, geometry.rows,
                                                                          geometry.cols):
        raise ReconstructionError(
            f"projections must be (V, rows, cols) = {(geometry.num_views, geometry.rows, geometry.cols)} "
            f"(optionally with a batch axis), got {tuple(projections.shape)}")
    if not projections.is_floating_point():
        raise ReconstructionError(f"projections must be floating point, got {projections.dtype}")
    if not torch.isfinite(projections).all():
        raise ReconstructionError("projections contain NaN or Inf")
    dt = torch.float64 if projections.dtype == torch.float64 else torch.float32
    p = projections.to(dt)
    p, geometry, measured = pad_displaced_detector(p, geometry)
    cosine, red, scale, info = _fdk_factors(geometry, measured=measured)
    # the per-view scale commutes with the row filter: applied with the pre-weights, in one pass; blocks of
    # views keep the weights' and the FFT's temporaries small on full-size scans
    red = red * scale[:, None]
    q = torch.empty(p.shape, device=p.device, dtype=dt)
    R, C = p.shape[-2:]
    step = max(1, _FILTER_BLOCK // (R * C))
    for v0 in range(0, p.shape[-3], step):
        sl = slice(v0, v0 + step)
        pre = cosine(sl)
        pre *= red[sl, None, :]
        q[..., sl, :, :] = ramp_filter(p[..., sl, :, :] * torch.from_numpy(pre).to(device=p.device, dtype=dt),
                                       filter, cutoff)
    mats = view_matrices(geometry, affine)
    vol = fdk_backproject(q, mats, volume_shape, distance_weight=geometry.kind == "cone",
                          backend=backend, progress=progress)
    info.update(filter=filter, cutoff=cutoff)
    return (vol, info) if return_info else vol


def fbp(projections: torch.Tensor, geometry: Geometry, volume_shape: Sequence[int], **kwargs):
    """Filtered backprojection; the same function as :func:`fdk` (which does parallel beam as plain FBP)."""
    return fdk(projections, geometry, volume_shape, **kwargs)


def fov_mask(geometry: Geometry, volume_shape: Sequence[int], *, affine=None, max_views: int = 60,
             backend: str = "auto", device=None) -> torch.Tensor:
    """Boolean (X, Y, Z) mask of the voxels whose centres project inside the detector in every view
    (checked on at most ``max_views`` evenly spaced views). With a displaced (half-fan) detector on a full
    scan, a voxel counts when every line through it is measured once (or twice): the detector is mirrored
    about its principal point for this test."""
    V = geometry.num_views
    idx = np.unique(np.linspace(0, V - 1, min(V, max_views)).round().astype(int)).tolist()
    g = _symmetric_detector(geometry)[idx]
    ones = torch.ones(len(idx), g.rows, g.cols, device=device or "cpu")
    count = fdk_backproject(ones, view_matrices(g, affine), volume_shape, distance_weight=False, backend=backend)
    return count >= len(idx) - 1e-3


def _principal_columns(g: Geometry) -> np.ndarray:
    """(V,) column index (fractional) of each view's principal point (foot of the source's perpendicular)."""
    S, c, u, v = g.source.numpy(), g.center.numpy(), g.u.numpy(), g.v.numpy()
    n = np.cross(u, v)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    F = S + ((c - S) * n).sum(1, keepdims=True) * n
    return ((F - c) * u).sum(1) / (u * u).sum(1) + (g.cols - 1) / 2


def _is_displaced_full_scan(g: Geometry, cF: np.ndarray) -> bool:
    left, right = cF, g.cols - 1 - cF
    if np.all(np.abs(left - right) < 0.1 * (g.cols - 1)):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_orbit(g).full_scan


def pad_displaced_detector(p: torch.Tensor, geometry: Geometry):
    """``(p, geometry, measured)``: for a cone-beam full scan with a sideways-displaced detector, the stack
    zero-padded on its short side to be symmetric about the principal point (the geometry widened to match,
    same pixel grid) so that the ramp filter's response beyond the real detector edge is backprojected too,
    as RTK's DisplacedDetectorImageFilter pads; ``measured`` the slice of real columns. Otherwise unchanged
    (``measured`` None)."""
    if geometry.kind != "cone" or geometry.num_views < 3:
        return p, geometry, None
    g = geometry.to("cpu")
    cF = _principal_columns(g)
    if not _is_displaced_full_scan(g, cF):
        return p, geometry, None
    excess = (g.cols - 1 - cF) - cF                                      # long side right: > 0
    if not (np.all(excess > 0) or np.all(excess < 0)):
        return p, geometry, None
    pad = int(np.ceil(np.abs(excess).max()))
    C = g.cols
    zeros = p.new_zeros(p.shape[:-1] + (pad,))
    if excess[0] > 0:                                                    # pad on the left (low columns)
        p2, center, measured = torch.cat([zeros, p], -1), g.center - g.u * (pad / 2), slice(pad, pad + C)
    else:
        p2, center, measured = torch.cat([p, zeros], -1), g.center + g.u * (pad / 2), slice(0, C)
    wide = Geometry.cone(g.source, center, g.u, g.v, g.rows, C + pad).to(geometry.device)
    return p2, wide, measured


def _symmetric_detector(geometry: Geometry) -> Geometry:
    """``geometry`` itself, or - for a cone-beam full scan with a displaced detector - the same views with
    the detector widened to be symmetric about each view's principal point (the foot of the source's
    perpendicular), covering the field of view the half-fan scan reconstructs."""
    if geometry.kind != "cone" or geometry.num_views < 3:
        return geometry
    g = geometry.to("cpu")
    cF = _principal_columns(g)
    if not _is_displaced_full_scan(g, cF):
        return geometry
    left, right = cF, g.cols - 1 - cF
    half = float(np.ceil(np.maximum(left, right).max()))
    cols = int(2 * half + 1)
    center = g.center + torch.from_numpy(cF - (g.cols - 1) / 2)[:, None] * g.u
    wide = Geometry.cone(g.source, center, g.u, g.v, g.rows, cols)
    return wide.to(geometry.device)
