"""Images -> features for the probes: the frozen X-WIN encoder, the same architecture at random init, and
down-sampled pixels; cached on disk, keyed by what they depend on.

Every image gets the preprocessing of pretraining: :func:`xwin.io.load_radiograph` (bright = dense, in
[0, 1]), resized (antialiased bilinear) to the encoder's square input, then
:func:`xwin.intensity.normalize_radiograph`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import XwinError

__all__ = ["EncoderSpec", "file_digest", "FileImages", "FeatureCache", "make_extractor", "compute_features", "PIXEL_SIZE"]

#: Side of the down-sampled image of the ``pixels`` baseline (before PCA).
PIXEL_SIZE = 32


class EncoderSpec:
    """What a feature vector depends on: encoder name (xwin, random, pixels), which/layer/seed and the
    pooling of the patch tokens: ``mean`` (all tokens, width D) or ``grid`` (mean over each quadrant of the
    token grid, concatenated: 4·D, keeps coarse position)."""

    def __init__(self, name: str, which: str = "target", layer: int = -1, seed: int = 0, pool: str = "mean"):
        if pool not in ("mean", "grid"):
            raise XwinError(f"pool must be 'mean' or 'grid', got {pool!r}")
        self.name, self.which, self.layer, self.seed, self.pool = name, which, int(layer), int(seed), pool

    def key(self) -> dict:
        k = {"name": self.name, "which": self.which, "layer": self.layer, "seed": self.seed}
        if self.pool != "mean" and self.name != "pixels":
            k["pool"] = self.pool
        return k


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (the checkpoint part of the cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


class FileImages:
    """Radiograph files as a lazy array: ``len()`` and ``[start:stop]`` -> (n, size, size) float32, loaded
    and preprocessed on demand (memory stays at one batch, whatever the data set's size). A file that does
    not decode gives a NaN image (and so NaN features); ``failed`` maps its index to the reason."""

    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), int(size)
        self.failed: dict = {}

    def __len__(self) -> int:
        return len(self.files)

    def _one(self, i: int) -> np.ndarray:
        from ..intensity import normalize_radiograph
        from ..io import load_radiograph

        try:
            img = load_radiograph(self.files[i], size=self.size)
            if not torch.isfinite(img).all():
                raise XwinError("NaN or Inf pixels")
            return normalize_radiograph(img.float()).numpy()
        except Exception as e:  # a corrupt or unsupported file: remembered, reported by the caller
            self.failed[i] = f"{type(e).__name__}: {e}"
            return np.full((self.size, self.size), np.nan, dtype=np.float32)

    def __getitem__(self, sl: slice) -> np.ndarray:
        idx = range(*sl.indices(len(self)))
        if not len(idx):
            return np.zeros((0, self.size, self.size), np.float32)
        return np.stack([self._one(i) for i in idx]).astype(np.float32)


def _bar(it, on: bool, desc: str):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def _random_vit(enc, seed: int):
    """A VisionTransformer of the same architecture as ``enc`` at its random initialisation."""
    from ..model import VisionTransformer

    blk = enc.blocks[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans,
                                 embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=blk.attn.heads,
                                 mlp_ratio=blk.mlp.fc1.out_features / enc.embed_dim).eval()


def make_extractor(spec: EncoderSpec, checkpoint, device: str = "cpu") -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(function images (B, S, S) -> features (B, D), input size S) for ``spec``."""
    import torch.nn.functional as F

    from ..model import load_encoder

    frozen = load_encoder(checkpoint, which=spec.which, map_location=device)
    vit = frozen.encoder
    size = int(vit.img_size)
    if spec.name == "pixels":
        def pixels(x: torch.Tensor) -> torch.Tensor:
            s = min(PIXEL_SIZE, size)
            return F.interpolate(x[:, None].float(), size=(s, s), mode="bilinear", align_corners=False,
                                 antialias=True).flatten(1)
        return pixels, size
    if spec.name == "random":
        vit = _random_vit(vit, spec.seed).to(device)
    elif spec.name != "xwin":
        raise XwinError(f"unknown encoder {spec.name!r} (xwin, random, pixels)")
    depth = len(vit.blocks)
    layer = spec.layer if spec.layer >= 0 else depth + spec.layer
    if not 0 <= layer < depth:
        raise XwinError(f"layer {spec.layer} out of range for an encoder of {depth} blocks")

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x[:, None].float().to(device) * 2.0 - 1.0
        t = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed.to(x.dtype)
        for blk in vit.blocks[: layer + 1]:
            t = blk(t)
        if layer == depth - 1:
            t = vit.norm(t)  # the final-norm tokens, as FrozenEncoder returns them
        if spec.pool == "grid":
            g = vit.grid
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)
            return F.adaptive_avg_pool2d(t, 2).flatten(1).cpu()
        return t.mean(dim=1).cpu()

    if layer == depth - 1 and spec.name == "xwin" and spec.pool == "mean":
        def encode_frozen(x: torch.Tensor) -> torch.Tensor:
            return frozen(x.to(device)).cpu()
        return encode_frozen, size
    return encode, size


class FeatureCache:
    """Features stored as ``DIR/cache/features-<sha>.npz``, the sha over checkpoint digest, encoder spec and
    image list. Files are written to a temporary name and renamed: a cache file is whole or absent."""

    def __init__(self, folder: Path, checkpoint_digest: str, images_key: str):
        self.folder = Path(folder)
        self.ckpt, self.images_key = checkpoint_digest, images_key

    def path(self, spec: EncoderSpec) -> Path:
        key = json.dumps({"ckpt": self.ckpt, "images": self.images_key, "spec": spec.key(), "v": 1}, sort_keys=True)
        return self.folder / f"features-{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"

    def get(self, spec: EncoderSpec) -> Optional[np.ndarray]:
        p = self.path(spec)
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                return z["features"]
        except Exception as e:  # a damaged cache file: recompute
            warnings.warn(f"ignoring unreadable cache file {p}: {e}", stacklevel=2)
            return None

    def put(self, spec: EncoderSpec, feats: np.ndarray) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.path(spec)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.folder)
        os.close(fd)
        try:
            np.savez(tmp, features=feats)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return p


def compute_features(extract, images, batch: int = 64, progress: bool = False, desc: str = "") -> np.ndarray:
    """Features of ``images`` ((N, S, S) array or :class:`FileImages`), in batches, optional progress bar."""
    return compute_many({desc or "x": extract}, images, batch, progress)[desc or "x"]


def compute_many(extractors: dict, images, batch: int = 64, progress: bool = False) -> dict:
    """Features of every extractor in one pass over ``images`` (each batch is loaded once)."""
    out: dict = {k: [] for k in extractors}
    for s in _bar(range(0, len(images), batch), progress, "features " + " ".join(extractors)):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch]))
        for k, ex in extractors.items():
            out[k].append(ex(x).numpy().astype(np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}
