"""The projection decoder's configuration, network, losses and targets (see :mod:`xwin.decoder`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import XwinError

DECODER_KIND = "xwin-projection-decoder"

__all__ = [
    "DecoderError", "DecoderConfig", "ProjectionDecoder", "ssim2d", "gradient_l1", "decoder_loss", "frontal_scale",
    "projection_targets", "DECODER_KIND",
]



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
        from ..model import Block, _init_transformer, sincos_pos_embed_2d

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
