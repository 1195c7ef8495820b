"""The X-WIN world model: a ViT encoder, its EMA twin, the view predictor g_v, the mask predictor g_m and
the domain classifier f_c.

Shapes used throughout (P = patches per image, D = encoder width, W = predictor width):

* images: ``(B, 1, H, W)`` float in [0, 1] (radiograph-like, after ``xwin.intensity.normalize_radiograph``);
  the encoder maps them to [-1, 1] itself, so downstream users feed the same normalised images.
* encoder tokens: ``(B, P, D)`` (no class token; fixed 2D sin-cos position embedding).
* actions: ``(B, N, 3)`` = (yaw, pitch, roll) in radians, one row per target view.

The losses live in :mod:`xwin.losses`; the training step that wires everything together lives in
:mod:`xwin.train`; the frozen encoder, safe loading and the safetensors format in :mod:`xwin.encoder` (its
names are also served from here). Everything here is plain PyTorch and runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import XwinError

__all__ = [
    "VIT_SIZES",
    "sincos_pos_embed_2d",
    "VisionTransformer",
    "ViewPredictor",
    "MaskPredictor",
    "DomainClassifier",
    "XWinModel",
    "build_model",
    "ema_update",
    "gather_tokens",
]

# (width, depth, heads) of the standard ViT sizes.
VIT_SIZES: Dict[str, tuple] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, ``(grid_h*grid_w, dim)``, rows in raster order.

    Half of the channels encode the row index, half the column index; each half is the 1D transformer
    embedding ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(-k/(dim/4))``.
    """
    if dim % 4 != 0:
        raise XwinError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    out_r = rr.reshape(-1, 1) * omega  # (P, quarter)
    out_c = cc.reshape(-1, 1) * omega
    emb = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return emb.float()


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, P, D), ``idx`` (B, K) long -> ``x[b, idx[b]]`` (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads != 0:
            raise XwinError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def _trunc_normal(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std²) truncated to ±2·std, by redrawing the values outside (torch's ``trunc_normal_``
    goes through erfinv and takes seconds for a ViT on a CPU)."""
    t.normal_(0.0, std)
    if t.is_meta:                       # shape-only construction (parameter counting): nothing to redraw
        return t
    out = t.abs() > 2 * std
    while out.any():
        t[out] = torch.randn(int(out.sum()), dtype=t.dtype, device=t.device) * std
        out = t.abs() > 2 * std
    return t


def _init_transformer(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """Truncated-normal init for linear/conv weights, zero biases, unit norms; residual output projections
    scaled down by sqrt(2·layer) (the I-JEPA/X-WIN recipe)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _trunc_normal(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


class VisionTransformer(nn.Module):
    """ViT encoder without class token and with a fixed 2D sin-cos position embedding.

    ``forward(images, keep=None)``: images ``(B, C, H, W)`` in [0, 1]; ``keep`` optional ``(B, K)`` long
    indices of the patches the encoder may see (I-JEPA context masking). Returns the final-norm tokens
    ``(B, P or K, D)``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, patch_init: str = "xavier"):
        super().__init__()
        if img_size % patch_size != 0:
            raise XwinError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid, self.grid)[None],
                             persistent=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        _init_transformer(self, self.blocks)
        # the patch projection is initialised like a linear layer (Xavier), as in MAE: with the 0.02
        # truncated normal the fixed position embedding dominates the tokens at init and every image
        # pools to nearly the same latent (cosine 0.9986 between the tiny run's targets; 0.98 with this)
        if patch_init == "xavier":
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[-2:] != (self.img_size, self.img_size):
            raise XwinError(f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x * 2.0 - 1.0).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:
            x = gather_tokens(x, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class ViewPredictor(nn.Module):
    """g_v: predicts the patch tokens of the projection after an action, from the context tokens.

    The context tokens are mapped to the predictor width and given position embeddings; an action token
    ``Linear(a)`` is prepended; a narrow transformer runs over ``[a, context]`` and the context positions
    are projected back to the encoder width. ``forward(ctx (B, P, D), actions (B, N, A)) -> (B, N, P, D)``.
    """

    def __init__(self, grid: int, embed_dim: int, width: int = 384, depth: int = 6, num_heads: int = 12,
                 action_dim: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        self.action_dim = action_dim
        self.embed = nn.Linear(embed_dim, width)
        self.action_embed = nn.Linear(action_dim, width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        _init_transformer(self, self.blocks)

    def forward(self, ctx: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        b, p, _ = ctx.shape
        if actions.dim() != 3 or actions.shape[0] != b or actions.shape[2] != self.action_dim:
            raise XwinError(f"actions must be (B={b}, N, {self.action_dim}), got {tuple(actions.shape)}")
        n = actions.shape[1]
        x = self.embed(ctx) + self.pos_embed.to(ctx.dtype)  # computed once per context image
        x = x.unsqueeze(1).expand(b, n, p, x.shape[-1]).reshape(b * n, p, x.shape[-1])
        a = self.action_embed(actions.reshape(b * n, 1, self.action_dim).to(x.dtype))
        x = torch.cat([a, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(self.norm(x)[:, 1:])
        return x.reshape(b, n, p, -1)


class MaskPredictor(nn.Module):
    """g_m: I-JEPA predictor. From the visible (context) tokens at ``keep`` it predicts the encoder tokens
    at the hidden positions ``pred``: ``forward(ctx (B, K, D), keep (B, K), pred (B, M)) -> (B, M, D)``."""

    def __init__(self, grid: int, embed_dim: int, width: int = 384, depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        _init_transformer(self, self.blocks)
        _trunc_normal(self.mask_token.data, 0.02)

    def forward(self, ctx: torch.Tensor, keep: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        b, k, _ = ctx.shape
        pos = self.pos_embed.to(ctx.dtype).expand(b, -1, -1)
        x = self.embed(ctx) + gather_tokens(pos, keep)
        q = self.mask_token.to(x.dtype) + gather_tokens(pos, pred)
        x = torch.cat([x, q], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x)[:, k:])


class DomainClassifier(nn.Module):
    """f_c: a token-wise MLP giving the logit of "real radiograph" for each predicted patch token.

    ``forward(tokens, frozen=False)``: with ``frozen=True`` the classifier runs with detached copies of its
    parameters, so a loss built on the output sends gradient into the tokens (the model) but never into
    f_c. That is how L_domain is isolated from the classifier (see :func:`xwin.losses.domain_loss`).
    """

    def __init__(self, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if not frozen:
            return self.net(tokens).squeeze(-1)
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        return torch.func.functional_call(self.net, params, (tokens,)).squeeze(-1)


@dataclass
class ModelConfig:
    size: str = "base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    pred_width: int = 384
    view_pred_depth: int = 6
    mask_pred_depth: int = 6
    pred_heads: int = 12
    action_dim: int = 3
    cls_hidden: int = 256
    patch_embed_init: str = "xavier"   # "xavier" (as MAE; our default) or "trunc_normal" (I-JEPA/X-WIN, 0.02)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ModelConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise XwinError(f"unknown model config keys: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.size not in VIT_SIZES:
            raise XwinError(f"unknown ViT size {self.size!r}; choose one of {sorted(VIT_SIZES)}")
        if self.img_size % self.patch_size != 0:
            raise XwinError(f"model.img_size {self.img_size} is not a multiple of model.patch_size {self.patch_size}")
        if self.patch_embed_init not in ("xavier", "trunc_normal"):
            raise XwinError("model.patch_embed_init must be 'xavier' or 'trunc_normal'")


class XWinModel(nn.Module):
    """The trainable part of X-WIN: context encoder f_θ, view predictor g_v, mask predictor g_m, domain
    classifier f_c. The EMA target encoder f_θ′ is kept outside (it has no gradient) — see
    :func:`build_model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.size not in VIT_SIZES:
            raise XwinError(f"unknown ViT size {cfg.size!r}; choose one of {sorted(VIT_SIZES)}")
        self.cfg = cfg
        dim, depth, heads = VIT_SIZES[cfg.size]
        self.encoder = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, dim, depth, heads,
                                         patch_init=cfg.patch_embed_init)
        grid = self.encoder.grid
        self.view_predictor = ViewPredictor(grid, dim, cfg.pred_width, cfg.view_pred_depth, cfg.pred_heads,
                                            cfg.action_dim)
        self.mask_predictor = MaskPredictor(grid, dim, cfg.pred_width, cfg.mask_pred_depth, cfg.pred_heads)
        self.domain_classifier = DomainClassifier(dim, cfg.cls_hidden)

    def forward(self, batch: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor],
                loss_cfg: dict) -> Dict[str, torch.Tensor]:
        """One full X-WIN forward pass returning every loss (single call so DDP sees one forward).

        ``batch``: ``context`` (B,1,H,W) simulated frontal view, ``actions`` (B,N,A), ``sim`` / ``real``
        images for MIM with ``sim_keep``/``sim_pred``/``real_keep``/``real_pred`` indices.
        ``targets``: EMA latents ``align`` (B,N,D) (pooled target-view tokens), ``view_tokens`` (B,N,P,D)
        (the EMA encoder's tokens of the target views), ``real_view_tokens`` (R,P,D) (its tokens of the real
        radiographs), ``sim_tokens`` (B,M,D), ``real_tokens`` (B,M,D) (layer-normed EMA tokens at the hidden
        positions, MIM), ``groups`` (B·N,).
        """
        from . import losses as L

        z_lat, z_patch = self.predict_views(batch["context"], batch["actions"])  # (B,N,D), (B,N,P,D)
        z = z_lat.flatten(0, 1)  # (B·N, D)
        t = targets["align"].flatten(0, 1)
        if loss_cfg.get("center_latents", True):
            # remove the batch mean from predictions and targets before the cosine similarities: pooled
            # ViT latents share a large common component (the tiny run's targets start at cosine 0.98 to
            # each other), which leaves InfoNCE almost no room; see docs/world_model.md
            z = z - z.mean(dim=0, keepdim=True)
            t = t - t.mean(dim=0, keepdim=True)
        out: Dict[str, torch.Tensor] = {}
        out["infonce"] = L.info_nce(z, t, loss_cfg["temperature"])
        out["affinity"] = L.affinity_loss(z, t, loss_cfg["temperature"], loss_cfg["affinity_temperature"],
                                          groups=targets.get("groups"))
        out["align"] = out["infonce"] + loss_cfg["lambda_affinity"] * out["affinity"]
        with torch.no_grad():
            out["top1"] = L.top1_accuracy(z.float(), t.float())

        enc = self.encoder
        sim_pred = self.mask_predictor(enc(batch["sim"], keep=batch["sim_keep"]), batch["sim_keep"],
                                       batch["sim_pred"])
        real_pred = self.mask_predictor(enc(batch["real"], keep=batch["real_keep"]), batch["real_keep"],
                                        batch["real_pred"])
        out["mim_sim"] = L.mim_loss(sim_pred, targets["sim_tokens"])
        out["mim_real"] = L.mim_loss(real_pred, targets["real_tokens"])
        out["mim"] = 0.5 * (out["mim_sim"] + out["mim_real"])
        # domain alignment on the view predictor's predicted patch tokens of the simulated target views
        # (the paper's z_patch) against the EMA encoder's tokens of real radiographs
        fc = self.domain_classifier
        out["patch_mse"] = L.mim_loss(z_patch, targets["view_tokens"])
        out["domain"] = L.domain_loss(z_patch, targets["view_tokens"], fc)
        out["cls"] = L.classifier_loss(fc, targets["real_view_tokens"], z_patch)
        with torch.no_grad():
            out["fc_acc"] = L.classifier_accuracy(fc, targets["real_view_tokens"], z_patch)
        out["loss"] = (out["align"] + loss_cfg["lambda_mim"] * out["mim"]
                       + loss_cfg["lambda_domain"] * out["domain"] + loss_cfg["lambda_cls"] * out["cls"])
        return out

    def predict_views(self, context_images: torch.Tensor, actions: torch.Tensor):
        """The world model's prediction of the target views: ``context_images`` (B, 1, H, W) in [0, 1] (the
        frontal views), ``actions`` (B, N, A) in radians -> ``(latents (B, N, D), patch_tokens (B, N, T, D))``.

        ``patch_tokens[b, n]`` are the predicted encoder tokens (T = patches per image, raster order) of the
        projection of CT b after action n, in the space of the EMA encoder's output tokens; ``latents`` are
        their mean over T (what InfoNCE and the affinity loss compare). Stable API (used by decoders).
        """
        tokens = self.view_predictor(self.encoder(context_images), actions)
        return tokens.mean(dim=2), tokens


def build_model(cfg: Union[ModelConfig, dict]) -> "tuple[XWinModel, VisionTransformer]":
    """Build the trainable model and its EMA target encoder (a frozen copy of the context encoder)."""
    import copy

    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    model = XWinModel(cfg)
    target = copy.deepcopy(model.encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    return model, target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ′ ← m·θ′ + (1−m)·θ for every parameter (buffers are copied)."""
    tp = list(target.parameters())
    op = [p.detach() for p in online.parameters()]
    if len(tp) != len(op):
        raise XwinError("target and online modules have different parameter lists")
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, op, alpha=1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


# using and sharing trained encoders (safe loading, safetensors) live in xwin.encoder; their names are also
# served from here, lazily (xwin.encoder imports this module, so an eager import would be circular)
_ENCODER_NAMES = ("ENCODER_FORMAT", "CheckpointError", "FrozenEncoder", "export_encoder", "load_encoder", "safe_load")


def __getattr__(name):
    if name in _ENCODER_NAMES:
        from . import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
