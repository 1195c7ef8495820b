"""Intensities: HU -> attenuation, radiograph formation, and the display / normalisation of radiographs.

* :func:`hu_to_mu` - linear attenuation coefficient in 1/mm from Hounsfield units.
* :func:`hu_to_density` - the "density" volume that DiffDRR (and so the official X-WIN DRRs) renders.
* :func:`radiograph` - Beer-Lambert intensity ``I0 * exp(-p)`` from line integrals, optional Poisson noise.
* :func:`display` - line integrals or intensities to a "bright = dense" image in [0, 1].
* :func:`normalize_radiograph` - THE normalisation applied to real and to simulated radiographs alike.

Functions accept ``torch.Tensor`` or ``numpy.ndarray`` and return the same kind.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from .errors import XwinError

__all__ = [
    "MU_WATER",
    "hu_to_mu",
    "mu_to_hu",
    "hu_to_density",
    "radiograph",
    "display",
    "normalize_radiograph",
    "normalize_views",
    "percentile_window",
    "apply_window",
]

Array = Union[torch.Tensor, np.ndarray]

#: Linear attenuation coefficient of water in 1/mm at about 70 keV (mass attenuation ~0.193 cm^2/g).
MU_WATER = 0.0192


def _to_torch(x) -> Tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). Integer inputs become float32."""
    if isinstance(x, torch.Tensor):
        t, was_np = x, False
    else:
        t, was_np = torch.as_tensor(np.asarray(x)), True
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float32)
    return t, was_np


def _back(t: torch.Tensor, was_np: bool):
    return t.detach().cpu().numpy() if was_np else t


def hu_to_mu(hu: Array, mu_water: float = MU_WATER) -> Array:
    """μ = μ_water · (1 + HU / 1000), clamped at 0, in 1/mm (for μ_water in 1/mm).

    Air (-1000 HU) -> 0, water (0 HU) -> μ_water, +1000 HU -> 2 μ_water. Values below -1000 HU
    (scanner padding such as -2048) clamp to 0. Differentiable (torch); integer input gives float32.
    """
    if mu_water <= 0:
        raise ValueError(f"mu_water must be positive, got {mu_water}")
    t, was_np = _to_torch(hu)
    mu = torch.clamp(t * (mu_water / 1000.0) + mu_water, min=0.0)
    return _back(mu, was_np)


def mu_to_hu(mu: Array, mu_water: float = MU_WATER) -> Array:
    """Inverse of :func:`hu_to_mu` (without the clamp): HU = 1000 · (μ / μ_water − 1)."""
    if mu_water <= 0:
        raise ValueError(f"mu_water must be positive, got {mu_water}")
    t, was_np = _to_torch(mu)
    return _back((t / mu_water - 1.0) * 1000.0, was_np)


def hu_to_density(hu: Array, bone_attenuation_multiplier: float = 1.0) -> Array:
    """The "density" volume DiffDRR renders by default (and so the official X-WIN DRRs), in [0, 1].

    DiffDRR 0.6.1 (``diffdrr.data.transform_hu_to_density``, applied in ``diffdrr.data.read``) maps a
    CT in HU as follows, and this function reproduces it:

    1. Three classes by HU: air ``HU <= -800``, soft tissue ``-800 < HU <= 350``, bone ``HU > 350``.
    2. Soft tissue keeps its HU value; air is raised to the smallest soft-tissue HU present in the
       volume (so air does not attenuate less than the least dense tissue, and everything below
       -800 HU, including -1000 air and -2048 padding, becomes one value); bone keeps its HU times
       ``bone_attenuation_multiplier`` (>1 makes bones stand out more).
    3. Min-max normalisation over the whole volume: subtract the minimum, divide by the maximum.

    The result depends on the volume as a whole (its soft-tissue minimum and its maximum), and air is
    not zero: it has the same value as the least dense soft tissue, which is 0 after step 3.
    If the volume holds no soft tissue, -800 HU stands in for the soft-tissue minimum; a constant
    volume maps to zeros. Works on batches only as one volume (the statistics are global).
    """
    t, was_np = _to_torch(hu)
    t = t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t
    air = t <= -800.0
    bone = t > 350.0
    soft = ~air & ~bone
    if soft.any():
        soft_min = t[soft].min()
    else:
        soft_min = torch.as_tensor(-800.0, dtype=t.dtype, device=t.device)
    d = torch.where(air, soft_min, torch.where(bone, t * bone_attenuation_multiplier, t))
    d = d - d.min()
    mx = d.max()
    d = d / mx if mx > 0 else torch.zeros_like(d)
    return _back(d, was_np)


def radiograph(
    line_integrals: Array,
    I0: Optional[float] = None,
    noise: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Array:
    """Beer-Lambert detector intensity ``I = I0 · exp(−p)`` from line integrals ``p`` (dimensionless).

    ``I0``: unattenuated intensity; ``None`` means 1 (normalised intensity, no noise possible).
    ``noise=True`` draws Poisson counts with mean ``I0 · exp(−p)``, so ``I0`` must then be the photon
    count per pixel (e.g. 1e4-1e5 for a chest radiograph); the noisy image is not differentiable.
    ``generator``: torch.Generator for reproducible noise.
    """
    p, was_np = _to_torch(line_integrals)
    if noise and I0 is None:
        raise ValueError("radiograph(noise=True) needs I0, the photon count per pixel (e.g. I0=1e5)")
    i0 = 1.0 if I0 is None else float(I0)
    if i0 <= 0:
        raise ValueError(f"I0 must be positive, got {I0}")
    intensity = i0 * torch.exp(-p)
    if noise:
        intensity = torch.poisson(intensity.detach(), generator=generator)
    return _back(intensity, was_np)


def _quantiles(x: torch.Tensor, qs) -> torch.Tensor:
    """Per-image quantiles over the last two dims: (..., len(qs)). Exact (sort based), any size."""
    flat = x.reshape(*x.shape[:-2], -1).to(torch.float64) if x.dim() >= 2 else x.reshape(1, -1).double()
    n = flat.shape[-1]
    s, _ = torch.sort(flat, dim=-1)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        w = pos - lo
        out.append(s[..., lo] * (1 - w) + s[..., hi] * w)
    return torch.stack(out, dim=-1)


def percentile_window(img: Array, low: float = 0.5, high: float = 99.5):
    """The per-image window ``(lo, hi)``: the ``low``-th and ``high``-th percentiles over the last two dims
    (tensors of shape ``img.shape[:-2]``; numpy arrays for numpy input)."""
    if not (0 <= low < high <= 100):
        raise XwinError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    t, was_np = _to_torch(img)
    if t.dim() < 2:
        raise XwinError(f"a percentile window needs (..., H, W), got shape {tuple(t.shape)}")
    q = _quantiles(t.detach(), (low / 100.0, high / 100.0)).to(t.dtype)
    return _back(q[..., 0], was_np), _back(q[..., 1], was_np)


def apply_window(img: Array, lo, hi, clip_high: bool = True) -> Array:
    """``(img − lo)/(hi − lo)`` clipped below at 0 (and above at 1 with ``clip_high``); ``lo``/``hi``
    broadcast over the last two dims. A window of zero width maps to zeros."""
    t, was_np = _to_torch(img)
    lo = torch.as_tensor(lo, dtype=t.dtype, device=t.device)[..., None, None]
    hi = torch.as_tensor(hi, dtype=t.dtype, device=t.device)[..., None, None]
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (t - lo) / safe, torch.zeros_like(t)).clamp(min=0.0)
    return _back(out.clamp(max=1.0) if clip_high else out, was_np)


def normalize_radiograph(
    img: Array,
    low: float = 0.5,
    high: float = 99.5,
) -> Array:
    """THE radiograph normalisation, shared by real radiographs and simulated ones (DRRs).

    A per-image percentile window: values at the ``low``-th and ``high``-th percentiles (over the
    last two dims, so ``(H, W)`` or batches ``(..., H, W)``) map to 0 and 1, clipped to [0, 1].
    Apply it to "bright = dense" images: a real radiograph from :func:`xwin.io.load_radiograph`, or a
    DRR's line integrals (monotone in density, so ``normalize_radiograph(p) == display(p)``).
    Both domains of the world model then see the same preprocessing. A constant image maps to zeros.
    Differentiable almost everywhere with respect to ``img`` (the window is treated as data).
    """
    lo, hi = percentile_window(img, low, high)
    return apply_window(img, lo, hi)


def normalize_views(views: Array, ref: int = 0, mode: str = "view", low: float = 0.5, high: float = 99.5) -> Array:
    """Normalise the views ``(V, H, W)`` of one CT (or one real radiograph, ``V = 1``).

    * ``mode="view"``: every view gets its own percentile window (:func:`normalize_radiograph`).
    * ``mode="ct"``: one window for all views, the percentile window of the reference view ``views[ref]``
      (the frontal view; a real radiograph is its own reference), clipped at 0 but not at 1, so the
      intensity scale shared by the views of a CT survives (a lateral view may exceed 1).
    """
    if mode == "view":
        return normalize_radiograph(views, low, high)
    if mode != "ct":
        raise XwinError(f"normalisation mode must be 'view' or 'ct', got {mode!r}")
    lo, hi = percentile_window(views[ref], low, high)
    return apply_window(views, lo, hi, clip_high=False)


def display(
    x: Array,
    kind: str = "line_integral",
    *,
    I0: Optional[float] = None,
    low: float = 0.5,
    high: float = 99.5,
    window: Optional[Tuple[float, float]] = None,
    gamma: float = 1.0,
) -> Array:
    """A "bright = dense" display image in [0, 1] from line integrals or detector intensities.

    * ``kind="line_integral"``: ``x`` is p = ∫μ dl (more material -> larger p -> brighter).
    * ``kind="intensity"``: ``x`` is I; it is first log-transformed, p = −log(I / I0), with ``I0`` the
      given unattenuated intensity or, if None, the image maximum (zero counts are clamped to 0.5
      before the log, so noisy low-dose images stay finite).

    Then p is windowed: ``window=(p_lo, p_hi)`` if given, else the robust per-image percentile window
    of :func:`normalize_radiograph` (``low``/``high`` percentiles). ``gamma`` != 1 applies ``y**gamma``.
    Multiply by 255 and round for an 8-bit image.
    """
    t, was_np = _to_torch(x)
    if kind in ("line_integral", "p", "line_integrals"):
        p = t
    elif kind in ("intensity", "I"):
        if I0 is None:
            ref = t.detach().reshape(*t.shape[:-2], -1).amax(-1)[..., None, None] if t.dim() >= 2 else t.max()
        else:
            ref = torch.as_tensor(float(I0), dtype=t.dtype, device=t.device)
        # Photon counts (I0 > 1): a zero count is clamped to half a photon; normalised I: to 1e-12.
        floor = 0.5 if float(torch.as_tensor(ref).max()) > 1.0 else 1e-12
        p = -torch.log(torch.clamp(t, min=floor) / ref)
    else:
        raise ValueError(f"display: kind must be 'line_integral' or 'intensity', got {kind!r}")
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(f"display: window must have hi > lo, got {window}")
        y = ((p - lo) / (hi - lo)).clamp(0.0, 1.0)
    else:
        y = normalize_radiograph(p, low=low, high=high)
    if gamma != 1.0:
        y = y.clamp(min=0.0) ** gamma
    return _back(y, was_np)
