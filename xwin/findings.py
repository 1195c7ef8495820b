"""Synthetic patients with inserted findings of exact ground truth, rendered as frontal radiographs.

The findings benchmark of ``python -m xwin.evaluate --benchmark findings`` needs no outside data:

* **Patients** are held-out procedural phantoms (seeds far from the ones pretraining uses, nodules off)
  and deformed copies of the embedded sample CT (:mod:`xwin.deform`, deformation seeds from 10^7 on), each with a structure map
  (lungs, heart) that follows the same deformation. Every patient has its own anatomy; a patient gives
  ``images_per_patient`` radiographs, each with its own random findings (so splits must be by patient).
* **Findings**, each a binary label, inserted into the CT (HU) before rendering:
  ``nodule`` (1-3 spheres of 5-30 mm diameter (uniform) in the lung, -350..60 HU: ground glass to solid, with a
  partial-volume edge), ``effusion`` (fluid of 0-30 HU filling the dependent - inferior-posterior - 5-35 %
  of one or both lungs), ``cardiomegaly`` (the heart scaled up by 12-40 % in-plane, painted over lung and
  fat), ``pneumothorax`` (an apico-lateral rim of 6-30 mm of one lung turned to air, the collapsed lung
  beneath it denser by 50-150 HU). Sizes and contrasts are drawn from these ranges so that some cases
  are obvious and others invisible at the rendering resolution.
* **Anatomy targets** (for the 3-D probe), measured on the final volume: ``ap_depth_mm`` (mean
  anterior-posterior depth of the body over the lung slices), ``heart_ap_mm`` (AP extent of the heart),
  ``heart_volume_ml``, ``lung_volume_ml`` (aerated lung, HU < -400 inside the lung structures).
* **Rendering**: :class:`xwin.render.Renderer` with the training config's pose, detector and
  normalisation (the frontal, action-0 view), so images look like the pretraining context views.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .deform import random_deformation
from .errors import XwinError
from .io import Volume, crop_or_pad, resample

__all__ = ["FINDINGS", "ANATOMY_TARGETS", "BenchmarkConfig", "Patient", "make_patient", "insert_findings",
           "anatomy_targets", "build_benchmark", "phantom_structures"]

#: Bumped whenever the generated images or labels change for the same settings (part of the cache key).
BENCHMARK_VERSION = 3

#: First deformation seed of the benchmark's patients (pretraining's deformed sample copies use 1..k).
DEFORM_SEED0 = 10_000_000

FINDINGS = ("nodule", "effusion", "cardiomegaly", "pneumothorax")
ANATOMY_TARGETS = ("ap_depth_mm", "heart_ap_mm", "heart_volume_ml", "lung_volume_ml")


class BenchmarkError(XwinError):
    """Bad benchmark settings (too few patients, a prevalence outside (0, 1), ...)."""


@dataclass
class BenchmarkConfig:
    patients: int = 80
    images_per_patient: int = 2
    sample_fraction: float = 0.5          # share of patients that are deformed copies of the sample CT
    phantom_seed0: int = 100_000          # phantom seeds used: phantom_seed0 + patient index (pretraining: 0..k)
    seed: int = 0                         # deformations and findings
    prevalence: float = 0.4               # probability of each finding per image
    deform_strength: float = 1.0
    ct_shape: Tuple[int, int, int] = (64, 64, 64)
    ct_spacing: Tuple[float, float, float] = (5.0, 5.0, 5.0)
    render: Dict = field(default_factory=dict)   # xwin.render.RenderConfig entries (the training config's)
    img_size: Optional[int] = None        # encoder input size (default: render size)
    density: str = "mu"                   # what is rendered: "mu" (hu_to_mu) or "density" (hu_to_density), as trained

    def validate(self) -> None:
        if self.patients < 6:
            raise BenchmarkError(f"the findings benchmark needs at least 6 patients, got {self.patients}")
        if self.images_per_patient < 1:
            raise BenchmarkError("images_per_patient must be >= 1")
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise BenchmarkError(f"sample_fraction must lie in [0, 1], got {self.sample_fraction}")
        if self.density not in ("mu", "density"):
            raise BenchmarkError(f"density must be 'mu' or 'density', got {self.density!r}")
        if not 0.0 < self.prevalence < 1.0:
            raise BenchmarkError(f"prevalence must lie in (0, 1), got {self.prevalence}")

    def key(self) -> dict:
        d = asdict(self)
        d["version"] = BENCHMARK_VERSION
        d["ct_shape"], d["ct_spacing"] = list(self.ct_shape), list(self.ct_spacing)
        return d


@dataclass
class Patient:
    """One synthetic patient on the rendering grid: HU volume and boolean structure masks."""

    pid: str
    hu: Volume
    lung: torch.Tensor     # (X, Y, Z) bool, both lungs incl. their vessels
    heart: torch.Tensor    # (X, Y, Z) bool
    side: torch.Tensor     # (X, 1, 1) +1 on the patient's right half (+x), -1 on the left


# ---------------------------------------------------------------------------------------- structures
@contextlib.contextmanager
def _sentinel_hu():
    """Temporarily give every phantom tissue a distinct, far-apart "HU" so a phantom call paints a label
    map (the phantom's geometry and random draws do not depend on the HU values)."""
    from . import phantom

    saved = dict(phantom.PHANTOM_HU)
    try:
        for i, k in enumerate(saved):
            phantom.PHANTOM_HU[k] = 0.0 if k == "air" else 10_000.0 * (i + 1)
        yield {k: (0 if k == "air" else i + 1) for i, k in enumerate(saved)}
    finally:
        phantom.PHANTOM_HU.clear()
        phantom.PHANTOM_HU.update(saved)


def phantom_structures(shape, spacing, seed: int) -> Tuple[Volume, Dict[str, torch.Tensor]]:
    """A nodule-free :func:`xwin.phantom.chest_phantom` (HU) and its ``lung``/``heart`` masks."""
    from .phantom import chest_phantom

    hu = chest_phantom(shape, spacing, seed=seed, nodules=False)
    with _sentinel_hu() as ids:
        lab = torch.round(chest_phantom(shape, spacing, seed=seed, nodules=False).data / 10_000.0).long()
    lung = (lab == ids["lung"]) | (lab == ids["vessel"])
    return hu, {"lung": lung, "heart": lab == ids["heart"]}


@lru_cache(maxsize=4)
def _sample_on_grid(shape: Tuple[int, ...], spacing: Tuple[float, ...]) -> Tuple[Volume, Volume]:
    """The sample CT and its structure map (0 bg, 1 lung, 2 heart) resampled and cropped to the grid."""
    from .data import sample_ct, sample_label_names, sample_labels

    ct, lab = sample_ct(), sample_labels()
    names = sample_label_names()
    code = torch.zeros_like(lab.data)
    for i, n in names.items():
        if n.startswith("lung_"):
            code[lab.data == i] = 1
        elif n == "heart":
            code[lab.data == i] = 2
    ct = resample(ct, spacing=spacing)
    lab = resample(Volume(code, lab.affine), spacing=spacing, mode="nearest", fill=0)
    body = torch.nonzero(ct.data > -500)
    center = body.double().mean(0).numpy() if len(body) else None
    return (crop_or_pad(ct, shape, center=center), crop_or_pad(lab, shape, fill=0, center=center))


def make_patient(index: int, cfg: BenchmarkConfig) -> Patient:
    """Patient ``index`` of the benchmark: a sample-CT copy (first ``sample_fraction``) or a phantom,
    deformed with its own seed."""
    shape, spacing = tuple(int(s) for s in cfg.ct_shape), tuple(float(s) for s in cfg.ct_spacing)
    n_sample = int(round(cfg.patients * cfg.sample_fraction))
    if index < n_sample:
        ct, lab = _sample_on_grid(shape, spacing)
        lung, heart, pid = lab.data == 1, lab.data == 2, f"sample-{index:04d}"
    else:
        seed = cfg.phantom_seed0 + index
        ct, masks = phantom_structures(shape, spacing, seed)
        lung, heart, pid = masks["lung"], masks["heart"], f"phantom-{seed}"
    # deformation seeds far from the small seeds pretraining uses for its deformed sample copies (1..k)
    d = random_deformation(ct, seed=DEFORM_SEED0 + cfg.seed * 100_003 + index, strength=cfg.deform_strength)
    codes = Volume(lung.long() + 2 * heart.long(), ct.affine)
    hu, codes = d.apply(ct), d.apply(codes)
    x = torch.as_tensor(hu.voxel_to_world(np.stack([np.arange(shape[0]), np.zeros(shape[0]), np.zeros(shape[0])], 1))[:, 0])
    side = torch.where(x >= float(hu.center_world[0]), 1, -1).view(-1, 1, 1)
    return Patient(pid=pid, hu=hu, lung=codes.data == 1, heart=codes.data == 2, side=side)


# ---------------------------------------------------------------------------------------- findings
def _coords(vol: Volume) -> torch.Tensor:
    """World mm of every voxel centre, (X, Y, Z, 3) float32."""
    shape = vol.spatial_shape
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    aff = torch.as_tensor(vol.affine, dtype=torch.float64)
    return (ijk @ aff[:3, :3].T + aff[:3, 3]).float()


def _lung_side(p: Patient, rng: np.random.Generator) -> torch.Tensor:
    s = 1 if rng.random() < 0.5 else -1
    m = p.lung & (p.side == s)
    return m if m.any() else p.lung


def _erode(mask: torch.Tensor, iters: int) -> torch.Tensor:
    m = mask.float()[None, None]
    for _ in range(iters):
        m = -F.max_pool3d(-m, 3, stride=1, padding=1)
    return m[0, 0] > 0.5


def _nodule(hu, p, xyz, rng, voxel):
    lung_idx = torch.nonzero(_erode(p.lung, 1))
    if len(lung_idx) == 0:
        lung_idx = torch.nonzero(p.lung)
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(2.5, 15.0))  # diameter 5-30 mm, uniform
        value = float(rng.uniform(-350.0, 60.0))
        c = xyz[tuple(lung_idx[int(rng.integers(len(lung_idx)))].tolist())]
        dist = (xyz - c).norm(dim=-1)
        occ = ((r - dist) / voxel + 0.5).clamp(0.0, 1.0) * p.lung  # partial volume at the edge, lung only
        hu.mul_(1 - occ).add_(occ * value)


def _effusion(hu, p, xyz, rng):
    sides = [1, -1] if rng.random() < 0.3 else [1 if rng.random() < 0.5 else -1]
    for s in sides:
        m = p.lung & (p.side == s)
        if not m.any():
            continue
        z, y = xyz[..., 2][m], xyz[..., 1][m]
        g = (z - z.min()) / (z.max() - z.min() + 1e-6) + 0.5 * (y - y.min()) / (y.max() - y.min() + 1e-6)
        thr = torch.quantile(g, float(rng.uniform(0.05, 0.35)))
        fluid = torch.zeros_like(m)
        fluid[m] = g <= thr
        hu[fluid] = float(rng.uniform(0.0, 30.0))
        p.lung = p.lung & ~fluid


def _cardiomegaly(hu, p, xyz, rng):
    if not p.heart.any():
        return
    c = xyz[p.heart].mean(0)
    s = float(rng.uniform(1.12, 1.40))
    scale = torch.tensor([s, s, 1.0 + 0.5 * (s - 1.0)])
    src = c + (xyz - c) / scale  # a voxel is heart if its pre-image under the enlargement is
    ijk = src.double() @ torch.as_tensor(np.linalg.inv(p.hu.affine)[:3, :3].T) + torch.as_tensor(
        np.linalg.inv(p.hu.affine)[:3, 3])
    shape = p.heart.shape
    norm = ijk / torch.tensor([n - 1 for n in shape], dtype=torch.float64) * 2 - 1
    big = F.grid_sample(p.heart.float()[None, None], norm.flip(-1)[None].float(), mode="nearest",
                        align_corners=True)[0, 0] > 0.5
    value = float(hu[p.heart].median())
    paint = big & ~p.heart & (hu < 250.0) & (hu > -1001.0)  # over lung and fat, never over bone
    hu[paint] = value
    p.heart = p.heart | paint
    p.lung = p.lung & ~paint


def _pneumothorax(hu, p, xyz, rng, voxel):
    m = _lung_side(p, rng)
    t = float(rng.uniform(6.0, 30.0))
    inner = _erode(m, max(1, int(round(t / voxel))))
    c = xyz[m].mean(0)
    side = float(np.sign(float((c[0] - float(p.hu.center_world[0])))) or 1.0)
    apico_lateral = ((xyz[..., 0] - c[0]) * side > 0) | (xyz[..., 2] > c[2])
    rim = m & ~inner & apico_lateral
    hu[rim] = -1000.0
    collapsed = m & inner
    hu[collapsed] = hu[collapsed] + float(rng.uniform(50.0, 150.0))


def insert_findings(p: Patient, labels: Dict[str, int], rng: np.random.Generator) -> Patient:
    """A copy of ``p`` with the findings whose label is 1 inserted (in a fixed order)."""
    hu = p.hu.data.clone().float()
    q = Patient(p.pid, Volume(hu, p.hu.affine.copy()), p.lung.clone(), p.heart.clone(), p.side)
    xyz = _coords(p.hu)
    voxel = float(np.min(p.hu.spacing))
    if labels.get("cardiomegaly"):
        _cardiomegaly(hu, q, xyz, rng)
    if labels.get("effusion"):
        _effusion(hu, q, xyz, rng)
    if labels.get("pneumothorax"):
        _pneumothorax(hu, q, xyz, rng, voxel)
    if labels.get("nodule"):
        _nodule(hu, q, xyz, rng, voxel)
    return q


def anatomy_targets(p: Patient) -> Dict[str, float]:
    """3-D quantities a frontal view does not show directly (see the module notes)."""
    from scipy import ndimage

    sp = p.hu.spacing
    vox_ml = float(np.prod(sp)) / 1000.0
    body = p.hu.data.numpy() > -400.0
    lab, n = ndimage.label(body)
    if n > 1:  # keep the largest component (drops a CT table, blankets, ...)
        sizes = ndimage.sum(body, lab, index=np.arange(1, n + 1))
        body = lab == (1 + int(np.argmax(sizes)))
    body = body | ndimage.binary_fill_holes(body)
    lung_slices = np.nonzero(p.lung.numpy().any(axis=(0, 1)))[0]
    ks = lung_slices if len(lung_slices) else np.arange(body.shape[2])
    depths = []
    for k in ks:
        ys = np.nonzero(body[:, :, k].any(axis=0))[0]
        if len(ys):
            depths.append((ys.max() - ys.min() + 1) * sp[1])
    hy = np.nonzero(p.heart.numpy().any(axis=(0, 2)))[0]
    return {
        "ap_depth_mm": float(np.mean(depths)) if depths else 0.0,
        "heart_ap_mm": float((hy.max() - hy.min() + 1) * sp[1]) if len(hy) else 0.0,
        "heart_volume_ml": float(p.heart.sum()) * vox_ml,
        "lung_volume_ml": float((p.lung & (p.hu.data < -400.0)).sum()) * vox_ml,
    }


# ---------------------------------------------------------------------------------------- benchmark
@dataclass
class _MuCT:
    """A μ volume for :meth:`xwin.render.Renderer.render`: a Volume-like object (``data``, ``affine``,
    ``center_world``) that also answers to the older CTItem names (``mu``, ``key``)."""

    data: torch.Tensor
    affine: np.ndarray
    key: int

    @property
    def mu(self) -> torch.Tensor:
        return self.data

    @property
    def center_world(self) -> np.ndarray:
        c = (np.asarray(self.data.shape[-3:], dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ c + self.affine[:3, 3]


def _render_frontal(vols: Sequence[Volume], cfg: BenchmarkConfig) -> torch.Tensor:
    """Frontal (action 0) views with the training pose and normalisation, (V, S, S) float32 in [0, 1]."""
    from .intensity import hu_to_density, hu_to_mu
    from .render import Renderer, RenderConfig

    rc = dict(cfg.render)
    rc["cache"] = False
    renderer = Renderer(RenderConfig.from_dict(rc), img_size=cfg.img_size)
    to_att = hu_to_mu if cfg.density == "mu" else hu_to_density
    items = [_MuCT(to_att(v.data.float()).contiguous(), v.affine, i) for i, v in enumerate(vols)]
    ctx, _ = renderer.render(items, torch.zeros(len(items), 1, 3, dtype=torch.float64))
    return ctx[:, 0].float().cpu()


def build_benchmark(cfg: BenchmarkConfig, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """All images of the benchmark: ``images`` (N, S, S) float32 in [0, 1], ``labels`` (N, F) int,
    ``targets`` (N, T) float, ``patients`` (N,) str, ``ids`` (N,) str, ``findings``, ``target_names``."""
    cfg.validate()
    rng = np.random.default_rng([int(cfg.seed), 0xF1D])
    images, labels, targets, patients, ids = [], [], [], [], []
    n_done, total = 0, cfg.patients * cfg.images_per_patient
    for i in range(cfg.patients):
        p = make_patient(i, cfg)
        vols = []
        for j in range(cfg.images_per_patient):
            lab = {f: int(rng.random() < cfg.prevalence) for f in FINDINGS}
            q = insert_findings(p, lab, rng)
            vols.append(q.hu)
            labels.append([lab[f] for f in FINDINGS])
            t = anatomy_targets(q)
            targets.append([t[k] for k in ANATOMY_TARGETS])
            patients.append(p.pid)
            ids.append(f"{p.pid}/{j}")
        images.append(_render_frontal(vols, cfg))
        n_done += len(vols)
        if progress is not None:
            progress(n_done, total)
    return {
        "images": torch.cat(images).numpy().astype(np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "targets": np.asarray(targets, dtype=np.float64),
        "patients": np.asarray(patients),
        "ids": np.asarray(ids),
        "findings": list(FINDINGS),
        "target_names": list(ANATOMY_TARGETS),
    }


def summary(bench: dict) -> List[str]:
    """Short human-readable lines: prevalence per finding, range of every anatomy target."""
    out = [f"{len(bench['ids'])} images of {len(set(bench['patients'].tolist()))} patients"]
    for k, f in enumerate(bench["findings"]):
        out.append(f"{f}: {int(bench['labels'][:, k].sum())} positive")
    for k, t in enumerate(bench["target_names"]):
        v = bench["targets"][:, k]
        out.append(f"{t}: {v.min():.1f}..{v.max():.1f} (mean {v.mean():.1f})")
    return out
