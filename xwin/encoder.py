"""Using and sharing a trained X-WIN encoder: the frozen encoder for downstream work, safe checkpoint loading
(``torch.load(weights_only=True)`` only) and the safetensors sharing format (:func:`export_encoder`).

Split from :mod:`xwin.model` (which re-exports every public name here) so that the network definitions and
the file formats each stay one screenful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import XwinError
from .model import VIT_SIZES, ModelConfig, VisionTransformer

__all__ = ["FrozenEncoder", "CheckpointError", "ENCODER_FORMAT", "safe_load", "export_encoder", "load_encoder"]


class FrozenEncoder(nn.Module):
    """A frozen X-WIN encoder for downstream use.

    ``forward(images)`` takes radiographs ``(B, H, W)`` or ``(B, 1, H, W)`` in [0, 1] (normalised with
    ``xwin.intensity.normalize_radiograph``, resized to ``img_size``) and returns mean-pooled features
    ``(B, D)``; ``tokens(images)`` returns the patch tokens ``(B, P, D)``.
    """

    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.img_size = encoder.img_size
        self.embed_dim = encoder.embed_dim

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.shape[-2:] != (self.img_size, self.img_size):
            images = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        p = next(self.encoder.parameters())
        return images.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._prep(images))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images).mean(dim=1)

    def train(self, mode: bool = True) -> "FrozenEncoder":  # stays in eval mode
        return super().train(False)


class CheckpointError(XwinError):
    """A checkpoint or encoder file that cannot be read safely (not plain weights, corrupt, wrong kind)."""


ENCODER_FORMAT = "xwin-encoder-v1"


def safe_load(path, map_location="cpu", allow: Sequence = ()) -> dict:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and numbers only, never code.

    A file whose unpickling would build other objects (or run a ``__reduce__``) is refused with a
    :class:`CheckpointError` before anything of it is executed. ``allow``: extra globals the caller vouches
    for (``torch.serialization.safe_globals``), e.g. numpy's array/dtype types for numpy RNG states.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(list(allow)):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {path}: not a plain-weights checkpoint "
                              f"(it is corrupt or unpickling it would run code or build objects: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(obj).__name__})")
    return obj


def _is_safetensors(path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _encoder_state(ckpt: dict, which: str) -> Dict[str, torch.Tensor]:
    if which not in ("target", "context"):
        raise XwinError("which must be 'target' or 'context'")
    if "model_config" not in ckpt:
        raise CheckpointError("not an X-WIN checkpoint: it has no 'model_config'")
    if which == "target":
        if "target_encoder" not in ckpt:
            raise CheckpointError("the checkpoint has no 'target_encoder'")
        return dict(ckpt["target_encoder"])
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in ckpt.get("model", {}).items() if k.startswith(prefix)}


def _build_encoder(model_config: dict) -> VisionTransformer:
    cfg = ModelConfig.from_dict(model_config)
    if cfg.size not in VIT_SIZES:
        raise CheckpointError(f"unknown ViT size {cfg.size!r} in the model config")
    dim, depth, heads = VIT_SIZES[cfg.size]
    return VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, dim, depth, heads)


def export_encoder(checkpoint, path, which: str = "target") -> Path:
    """Write the encoder of an X-WIN training checkpoint (a path or a loaded dict) as safetensors.

    The file holds the encoder's weights (float tensors, no code) and, in the safetensors metadata, the
    model config (``xwin_model_config``, JSON), which encoder it is (``xwin_which``) and the format tag
    (``format = "xwin-encoder-v1"``). :func:`load_encoder` reads it back.
    """
    from safetensors.torch import save_file

    ckpt = checkpoint if isinstance(checkpoint, dict) else safe_load(checkpoint)
    state = {k: v.detach().cpu().contiguous() for k, v in _encoder_state(ckpt, which).items()}
    meta = {"format": ENCODER_FORMAT, "xwin_which": which,
            "xwin_model_config": json.dumps(dict(ckpt["model_config"]), sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _load_safetensors_encoder(path, map_location) -> VisionTransformer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}") from None
    if meta.get("format") != ENCODER_FORMAT or "xwin_model_config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an exported X-WIN encoder "
                              f"(metadata format={meta.get('format')!r})")
    enc = _build_encoder(json.loads(meta["xwin_model_config"]))
    enc.load_state_dict(state)
    return enc


def load_encoder(checkpoint, which: str = "target", map_location="cpu") -> FrozenEncoder:
    """A frozen encoder from an exported encoder (``.safetensors``, see :func:`export_encoder`), an X-WIN
    training checkpoint (a path, read with ``weights_only=True``) or an already loaded checkpoint dict.

    For a checkpoint, ``which="target"`` (default) gives the EMA encoder f_θ′ (the usual JEPA choice for
    downstream use), ``which="context"`` the online encoder f_θ. An exported file holds one encoder.
    """
    if which not in ("target", "context"):
        raise XwinError("which must be 'target' or 'context'")
    if not isinstance(checkpoint, dict) and _is_safetensors(checkpoint):
        enc = _load_safetensors_encoder(checkpoint, map_location)
    else:
        ckpt = checkpoint if isinstance(checkpoint, dict) else safe_load(checkpoint, map_location)
        state = _encoder_state(ckpt, which)  # checks that it is an X-WIN checkpoint
        enc = _build_encoder(ckpt["model_config"])
        enc.load_state_dict(state)
    for p in enc.parameters():
        p.requires_grad_(False)
    return FrozenEncoder(enc.to(map_location) if isinstance(map_location, (str, torch.device)) else enc)
