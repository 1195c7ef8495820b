"""X-WIN world-model training with target projections rendered on the fly.

    python -m xwin.train --config tiny                       # embedded sample CT + phantoms + sample CXR
    python -m xwin.train --config paper --ct CT_DIR --cxr CXR_DIR --out runs/paper
    torchrun --nproc_per_node 8 -m xwin.train --config paper --ct ... --cxr ...

Every step: draw B CTs and, per CT, N actions; render the frontal context view and the N target views
with :mod:`xwin.render` on the training device; draw B real radiographs (random resized crops) and
I-JEPA block masks; encode targets with the EMA encoder; one forward of :class:`xwin.model.XWinModel`
gives all losses (:mod:`xwin.losses`); AdamW step with gradient clipping; EMA update.

Run folder (``--out``): ``config.json``, ``metrics.jsonl`` (one JSON line per logged step),
``checkpoint.pt`` (written atomically; a run restarted with the same ``--out`` resumes exactly),
``summary.json`` and ``curve.png`` at the end.

Randomness: model initialisation from ``seed``; all data randomness (CT choice, actions, radiograph crops,
masks) from one ``torch.Generator`` per rank, seeded from (seed, rank) and saved in checkpoints.
Schedules (lr, weight decay, EMA momentum) are pure functions of the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .masks import BlockMaskConfig, sample_block_masks
from .model import ModelConfig, build_model, ema_update, gather_tokens
from .render import CTItem, RenderConfig, Renderer, actions_to_model
from .errors import XwinError

__all__ = ["main", "train", "load_config", "DataSourceError", "CTPool", "RadiographPool", "lr_at", "wd_at",
           "momentum_at", "plot_run"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict = {
    "name": "custom",
    "seed": 0,
    "steps": 1000,
    "batch_size": 4,           # CTs (and real radiographs) per rank per step
    "log_every": 1,
    "ckpt_every": 100,
    "model": {},
    "render": {},
    "masks": {},
    "data": {
        "ct_shape": [64, 64, 64],
        "ct_spacing": [5.0, 5.0, 5.0],
        "phantoms": 8,             # procedural phantoms used when no --ct is given
        "phantoms_with_ct": 0,     # phantoms mixed in when --ct is given
        "sample_ct": True,         # the embedded real CT, used when no --ct is given
        "ct_cache_size": 64,       # preprocessed CTs kept on the device (LRU)
        "real_load_size": 256,     # real radiographs kept with this short side, cropped from there
        "real_crop_scale": [0.6, 1.0],
        "real_crop_ratio": [0.75, 1.333],
        "radiograph_cache_size": 512,
    },
    "loss": {
        "temperature": 0.1,
        "affinity_temperature": 0.05,
        "lambda_affinity": 0.5,
        "lambda_mim": 1.0,
        "lambda_domain": 0.1,
        "lambda_cls": 1.0,
        "center_latents": True,    # subtract the batch mean of z and t before the alignment losses
        "mim_sim_view": "target",  # simulated MIM image: a random target view ("target") or the context
    },
    "optim": {
        "lr": 1e-4,                # peak lr = lr * global_batch / lr_ref_batch (official: 1e-4, 256)
        "lr_ref_batch": 256,
        "start_lr": 2e-5,
        "final_lr": 1e-6,
        "warmup_steps": 100,
        "wd": 0.004,
        "final_wd": 0.04,
        "ema": [0.996, 1.0],
        "clip_grad": 1.0,
        "betas": [0.9, 0.999],
    },
}


class DataSourceError(XwinError):
    """A CT or radiograph source is empty, missing or unreadable."""


# ----------------------------------------------------------------------------------------------- config

def _deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_path(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def load_config(name_or_path: str = "tiny", overrides: Sequence[str] = ()) -> dict:
    """A built-in config name (``tiny``, ``paper``) or a JSON path, merged over :data:`DEFAULTS`, then the
    ``key.sub=value`` overrides (values parsed as JSON when possible)."""
    p = Path(name_or_path)
    if not p.suffix and (CONFIG_DIR / f"{name_or_path}.json").exists():
        p = CONFIG_DIR / f"{name_or_path}.json"
    if not p.exists():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"config {name_or_path!r} not found (built-in configs: {names})")
    with open(p) as f:
        user = json.load(f)
    cfg = _deep_update(DEFAULTS, user)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        _set_path(cfg, k.strip(), val)
    # validate the typed sections early
    if cfg["loss"].get("mim_sim_view", "target") not in ("target", "context"):
        raise ValueError("loss.mim_sim_view must be 'target' or 'context'")
    ModelConfig.from_dict(cfg["model"])
    RenderConfig.from_dict(cfg["render"])
    BlockMaskConfig.from_dict(cfg["masks"])
    return cfg


# ------------------------------------------------------------------------------------------- schedules

def lr_at(step: int, total: int, o: dict, peak: float) -> float:
    """Linear warm-up start_lr -> peak over ``warmup_steps``, then cosine decay peak -> final_lr."""
    w = int(o["warmup_steps"])
    if step < w:
        return o["start_lr"] + (peak - o["start_lr"]) * step / max(1, w)
    t = (step - w) / max(1, total - w)
    return o["final_lr"] + (peak - o["final_lr"]) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def wd_at(step: int, total: int, o: dict) -> float:
    """Cosine weight-decay schedule from ``wd`` (0.004) at step 0 to ``final_wd`` (0.04) at the end."""
    t = min(1.0, step / max(1, total))
    return o["final_wd"] + (o["wd"] - o["final_wd"]) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_at(step: int, total: int, o: dict) -> float:
    """EMA momentum rising linearly from ema[0] (0.996) to ema[1] (1.0) over training."""
    m0, m1 = o["ema"]
    return m0 + (m1 - m0) * min(1.0, step / max(1, total))


# ------------------------------------------------------------------------------------------------ data

_VOLUME_SUFFIXES = (".nii", ".nii.gz")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


def _is_dicom_file(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def discover_cts(sources: Sequence[str]) -> List[Path]:
    """NIfTI files and DICOM-series folders under the given files/folders (recursively), sorted."""
    found: List[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists():
            raise DataSourceError(f"CT source not found: {p}")
        if p.is_file():
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            r = Path(root)
            vols = [r / f for f in sorted(files) if f.lower().endswith(_VOLUME_SUFFIXES)]
            found.extend(vols)
            others = [r / f for f in sorted(files) if not f.lower().endswith(_VOLUME_SUFFIXES)]
            if any(_is_dicom_file(f) for f in others[:20]):
                found.append(r)  # a DICOM series folder
    if not found:
        raise DataSourceError(f"no CT volumes (.nii/.nii.gz files or DICOM series folders) found in {list(sources)}")
    return found


def discover_radiographs(sources: Sequence[str]) -> List[Path]:
    found: List[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists():
            raise DataSourceError(f"radiograph source not found: {p}")
        if p.is_file():
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                q = Path(root) / f
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

    Entries: files/DICOM folders, the embedded sample CT, procedural phantoms (by seed).
    """

    def __init__(self, paths: Sequence[Path], phantoms: int, sample_ct: bool, shape, spacing,
                 device: torch.device, dtype: torch.dtype = torch.float32, cache_size: int = 64):
        self.entries: List[tuple] = [("file", Path(p)) for p in paths]
        if sample_ct:
            self.entries.append(("sample", None))
        self.entries += [("phantom", s) for s in range(int(phantoms))]
        if not self.entries:
            raise DataSourceError("the CT pool is empty: give --ct, or enable data.sample_ct / data.phantoms")
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
        self.device, self.dtype = device, dtype
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> str:
        kinds = [e[0] for e in self.entries]
        return ", ".join(f"{kinds.count(k)} {k}" for k in ("file", "sample", "phantom") if k in kinds)

    def _load(self, i: int) -> CTItem:
        from .intensity import hu_to_mu
        from .io import crop_or_pad, load_volume, resample

        kind, what = self.entries[i]
        try:
            if kind == "phantom":
                from .data import chest_phantom
                vol = chest_phantom(self.shape, self.spacing, seed=int(what))
            else:
                if kind == "sample":
                    from .data import sample_ct
                    vol = sample_ct()
                else:
                    vol = load_volume(what)
                if vol.data.dim() != 3 or min(vol.spatial_shape) < 1:
                    raise DataSourceError(f"not a 3D volume: shape {vol.shape}")
                vol = crop_or_pad(resample(vol, spacing=self.spacing), self.shape)
        except DataSourceError:
            raise
        except Exception as e:  # unreadable, corrupt, wrong type: say which one
            name = what if kind == "file" else kind
            raise DataSourceError(f"cannot read CT {name}: {type(e).__name__}: {e}") from e
        if not torch.isfinite(vol.data).all():
            raise DataSourceError(f"CT {what or kind} holds NaN or Inf values")
        mu = hu_to_mu(vol.data.float()).to(device=self.device, dtype=self.dtype).contiguous()
        return CTItem(mu=mu, affine=np.asarray(vol.affine, dtype=np.float64), key=i)

    def get(self, i: int) -> CTItem:
        return self._cache.get_or(i, lambda: self._load(i))


class RadiographPool:
    """Real radiographs (files, or the embedded sample), kept with short side ``load_size`` (LRU cache),
    served as random resized crops normalised with :func:`xwin.intensity.normalize_radiograph`."""

    def __init__(self, paths: Sequence[Path], sample: bool, load_size: int, device: torch.device,
                 cache_size: int = 512):
        self.entries: List[tuple] = [("file", Path(p)) for p in paths]
        if sample:
            self.entries.append(("sample", None))
        if not self.entries:
            raise DataSourceError("the radiograph pool is empty: give --cxr with at least one radiograph")
        self.load_size, self.device = int(load_size), device
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> torch.Tensor:
        from .io import load_radiograph

        kind, what = self.entries[i]
        try:
            if kind == "sample":
                from .data import sample_radiograph
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
               ratio=(0.75, 1.333)) -> torch.Tensor:
        """(batch, 1, out_size, out_size) random resized crops in [0, 1]."""
        from .intensity import normalize_radiograph

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
            out.append(normalize_radiograph(crop[0]))
        return torch.stack(out)


# ----------------------------------------------------------------------------------------- distributed

def _dist_setup(device_arg: Optional[str]):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) initialises the process group: NCCL on CUDA,
    gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        dev = torch.device(device_arg)
    else:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def replica_divergence(modules: Sequence[torch.nn.Module]) -> float:
    """Max |θ_rank − θ_rank0| over all parameters and ranks (0.0 when not distributed)."""
    if not _is_dist():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for m in modules for p in m.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    d = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return float(d.item())


# ------------------------------------------------------------------------------------------ checkpoint

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _comparable(cfg: dict) -> dict:
    c = copy.deepcopy(cfg)
    c.pop("stop_after", None)
    return c


# --------------------------------------------------------------------------------------------- training

def _param_groups(model: torch.nn.Module):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def train(cfg: dict, out_dir, ct: Sequence[str] = (), cxr: Sequence[str] = (), device: Optional[str] = None,
          stop_after: Optional[int] = None, resume: bool = True, progress: bool = True,
          plot: bool = True) -> dict:
    """Train X-WIN with ``cfg`` (see :func:`load_config`), writing the run folder ``out_dir``.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, keeping the schedule of
    ``cfg['steps']`` — a later call with the same folder resumes. Returns the summary dict (rank 0; other
    ranks get the same keys).
    """
    rank, world, dev = _dist_setup(device)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if _is_dist():
        dist.barrier()
    total = int(cfg["steps"])
    B = int(cfg["batch_size"])
    if total < 1 or B < 1:
        raise ValueError("steps and batch_size must be >= 1")
    mcfg = ModelConfig.from_dict(cfg["model"])
    rcfg = RenderConfig.from_dict(cfg["render"])
    kcfg = BlockMaskConfig.from_dict(cfg["masks"])
    dcfg, lcfg, ocfg = cfg["data"], cfg["loss"], cfg["optim"]

    # ---- data (errors surface here, before any training)
    ct_paths = discover_cts(ct) if ct else []
    cxr_paths = discover_radiographs(cxr) if cxr else []
    vol_dtype = getattr(torch, rcfg.volume_dtype)
    pool = CTPool(ct_paths, dcfg["phantoms_with_ct"] if ct else dcfg["phantoms"],
                  bool(dcfg["sample_ct"]) and not ct, dcfg["ct_shape"], dcfg["ct_spacing"], dev, vol_dtype,
                  dcfg["ct_cache_size"])
    rads = RadiographPool(cxr_paths, not cxr, dcfg["real_load_size"], dev, dcfg["radiograph_cache_size"])
    pool.get(0)  # fail early and clearly on an unreadable first entry
    rads.get(0)
    renderer = Renderer(rcfg, img_size=mcfg.img_size)

    # ---- model, EMA target, optimiser
    torch.manual_seed(int(cfg["seed"]))
    model, target = build_model(mcfg)
    model.to(dev)
    target.to(dev)
    groups = _param_groups(model)
    opt = torch.optim.AdamW(groups, lr=ocfg["start_lr"], betas=tuple(ocfg["betas"]), weight_decay=0.0)
    global_batch = B * world
    peak_lr = ocfg["lr"] * global_batch / ocfg["lr_ref_batch"]
    gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1_000_003 + 7919 * rank + 1)
    ddp = model
    if _is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)

    # ---- resume
    ckpt_path = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    start = 0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if _comparable(ck["config"]) != _comparable(cfg):
            raise ValueError(f"{ckpt_path} was written with a different config; use another --out, or the "
                             "same config to resume")
        if ck["world_size"] != world:
            raise ValueError(f"{ckpt_path} was written by {ck['world_size']} processes, this run has {world}: "
                             "an exact resume needs the same world size")
        model.load_state_dict(ck["model"])
        target.load_state_dict(ck["target_encoder"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["data_rng"][rank])
        _set_rng_state(ck["rng"][rank], dev)
        start = int(ck["step"])
        if rank == 0 and metrics_path.exists():  # drop lines logged after the checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start]
            _atomic_write_text("".join(k + "\n" for k in keep), metrics_path)
        del ck
    elif rank == 0:
        metrics_path.write_text("")
    if rank == 0:
        _atomic_write_text(json.dumps(cfg, indent=2) + "\n", out / "config.json")

    def save(step: int) -> None:
        rng = [_rng_state(dev)]
        gens = [gen.get_state()]
        if _is_dist():
            rng = [None] * world
            gens = [None] * world
            dist.all_gather_object(rng, _rng_state(dev))
            dist.all_gather_object(gens, gen.get_state())
        if rank == 0:
            _atomic_save({
                "step": step, "config": cfg, "model_config": cfg["model"], "world_size": world,
                "model": model.state_dict(), "target_encoder": target.state_dict(),
                "optimizer": opt.state_dict(), "rng": rng, "data_rng": gens,
                "schedule": {"lr": lr_at(step, total, ocfg, peak_lr), "wd": wd_at(step, total, ocfg),
                             "momentum": momentum_at(step, total, ocfg), "peak_lr": peak_lr},
            }, ckpt_path)

    # ---- loop
    end = total if stop_after is None else min(total, int(stop_after))
    use_amp = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    grid = model.encoder.grid
    params = [p for p in model.parameters() if p.requires_grad]
    pbar = None
    if progress and rank == 0 and end > start:
        from tqdm.auto import tqdm
        pbar = tqdm(total=end, initial=start, desc=f"x-win {cfg.get('name', '')}", dynamic_ncols=True,
                    file=sys.stderr)
    history: List[dict] = []
    t_loop = time.perf_counter()
    render_total, step_total = 0.0, 0.0
    mf = open(metrics_path, "a") if rank == 0 else None
    try:
        model.train()
        for step in range(start, end):
            t0 = time.perf_counter()
            lr, wd, mom = lr_at(step, total, ocfg, peak_lr), wd_at(step, total, ocfg), momentum_at(step, total, ocfg)
            for g in opt.param_groups:
                g["lr"] = lr
                g["weight_decay"] = wd if g.get("apply_wd") else 0.0

            # data: every random draw comes from `gen`, in a fixed order
            n_pool = len(pool)
            idx = (torch.randperm(n_pool, generator=gen)[:B] if n_pool >= B
                   else torch.randint(0, n_pool, (B,), generator=gen)).tolist()
            actions = renderer.sample_actions(B, gen)
            real = rads.sample(B, mcfg.img_size, gen, tuple(dcfg["real_crop_scale"]), tuple(dcfg["real_crop_ratio"]))
            sim_keep, sim_pred = sample_block_masks(B, grid, kcfg, gen)
            real_keep, real_pred = sample_block_masks(B, grid, kcfg, gen)
            r0 = renderer.render_seconds
            ctx, tgt = renderer.render([pool.get(i) for i in idx], actions)
            t_render = renderer.render_seconds - r0
            n = tgt.shape[1]
            # simulated MIM view: one random target view per CT ("target", sees every yaw) or the frontal
            # context view ("context", as the official code)
            sim_on_target = lcfg.get("mim_sim_view", "target") == "target"
            pick = torch.randint(0, n, (B,), generator=gen).to(dev) if sim_on_target else None

            with torch.no_grad(), amp():
                imgs = torch.cat([tgt.flatten(0, 1)] + ([] if sim_on_target else [ctx]) + [real])
                h = target(imgs)
                h_align = h[: B * n].float().mean(dim=1).reshape(B, n, -1)
                h_rest = F.layer_norm(h.float(), (h.shape[-1],))
                if sim_on_target:
                    h_sim = h_rest[torch.arange(B, device=dev) * n + pick]
                    sim = tgt[torch.arange(B, device=dev), pick]
                else:
                    h_sim = h_rest[B * n: B * n + B]
                    sim = ctx
                h_real = h_rest[-B:]
                targets = {
                    "align": h_align,
                    "sim_tokens": gather_tokens(h_sim, sim_pred.to(dev)),
                    "real_tokens": gather_tokens(h_real, real_pred.to(dev)),
                    "groups": torch.arange(B, device=dev).repeat_interleave(n),
                }
            batch = {
                "context": ctx, "actions": actions_to_model(actions).to(dev),
                "sim": sim, "sim_keep": sim_keep.to(dev), "sim_pred": sim_pred.to(dev),
                "real": real, "real_keep": real_keep.to(dev), "real_pred": real_pred.to(dev),
            }
            with amp():
                losses = ddp(batch, targets, lcfg)
            losses["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, float(ocfg["clip_grad"]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema_update(target, model.encoder, mom)

            keys = ["loss", "align", "infonce", "affinity", "top1", "mim", "mim_sim", "mim_real", "domain", "cls"]
            vals = torch.stack([losses[k].detach().float() for k in keys] + [gnorm.detach().float()])
            if _is_dist():
                dist.all_reduce(vals)
                vals /= world
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            render_total += t_render
            step_total += dt
            rec = {"step": step + 1, **{k: float(v) for k, v in zip(keys + ["grad_norm"], vals.tolist())},
                   "lr": lr, "wd": wd, "momentum": mom, "step_time": dt, "render_time": t_render}
            if not all(math.isfinite(rec[k]) for k in keys):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {rec}")
            history.append(rec)
            if rank == 0:
                if (step + 1) % int(cfg["log_every"]) == 0 or step + 1 == end:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{rec['loss']:.3f}", align=f"{rec['align']:.3f}",
                                     top1=f"{rec['top1']:.2f}", refresh=False)
            if (step + 1) % int(cfg["ckpt_every"]) == 0 or step + 1 == end:
                save(step + 1)
    finally:
        if pbar is not None:
            pbar.close()
        if mf is not None:
            mf.close()

    wall = time.perf_counter() - t_loop
    divergence = replica_divergence([model, target])
    k = max(1, min(20, len(history) // 5))
    first, last = history[:k], history[-k:]

    def avg(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    summary = {
        "config": cfg.get("name"), "steps_done": end, "steps_total": total, "steps_this_run": len(history),
        "world_size": world, "device": str(dev), "batch_per_rank": B, "targets_per_ct": rcfg.n_targets,
        "chance_top1": 1.0 / (B * rcfg.n_targets), "wall_seconds": wall,
        "mean_step_seconds": step_total / max(1, len(history)),
        "render_fraction": render_total / step_total if step_total > 0 else float("nan"),
        "views_rendered": renderer.views_rendered, "average_over_steps": k,
        "align_step1": history[0]["align"] if start == 0 and history else float("nan"),
        "top1_step1": history[0]["top1"] if start == 0 and history else float("nan"),
        "align_start": avg(first, "align"), "align_end": avg(last, "align"),
        "top1_start": avg(first, "top1"), "top1_end": avg(last, "top1"),
        "loss_start": avg(first, "loss"), "loss_end": avg(last, "loss"),
        "replica_max_abs_diff": divergence, "ct_pool": pool.describe(), "radiographs": len(rads),
    }
    if rank == 0:
        _atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
        if plot and end == total and len(history) > 1:
            try:
                plot_run(out, out / "curve.png")
            except Exception as e:  # a missing display backend must not fail a finished run
                print(f"[xwin.train] could not plot: {e}", file=sys.stderr)
    return summary


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(y) < w:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    s = (c[w:] - c[:-w]) / w
    return np.concatenate([np.full(w - 1, np.nan), s])


def plot_run(run_dir, png) -> None:
    """Alignment loss and top-1 matching accuracy (raw and moving average) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summ = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    steps = np.array([r["step"] for r in rows])
    w = max(1, len(rows) // 20)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for a, key, title in ((ax[0], "align", "alignment loss (InfoNCE + λ·affinity)"),
                          (ax[1], "top1", "top-1 latent matching accuracy"),
                          (ax[2], "mim", "MIM loss (sim + real)")):
        y = np.array([r[key] for r in rows])
        a.plot(steps, y, color="0.75", lw=0.8, label="per step")
        a.plot(steps, _smooth(y, w), color="C0", lw=1.8, label=f"moving average ({w})")
        a.set_title(title, fontsize=10)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    if "chance_top1" in summ:
        ax[1].axhline(summ["chance_top1"], color="C3", ls="--", lw=1, label="chance")
    ax[1].legend(fontsize=8)
    name = summ.get("config", "")
    fig.suptitle(f"X-WIN {name} run: {summ.get('world_size', 1)}×{summ.get('batch_per_rank', '?')} CTs × "
                 f"{summ.get('targets_per_ct', '?')} targets per step, {summ.get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xwin.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="built-in config (tiny, paper) or a JSON file")
    p.add_argument("--ct", nargs="+", default=[], help="CT files / folders (NIfTI, DICOM series)")
    p.add_argument("--cxr", nargs="+", default=[], help="real radiograph files / folders (PNG, JPEG, DICOM)")
    p.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides the config)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a checkpoint after this many steps, keeping the schedule of --steps")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set batch_size=8 render.method=trilinear")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run folder has a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write curve.png at the end")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = list(args.set)
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        cfg = load_config(args.config, overrides)
        out = args.out or os.path.join("runs", str(cfg.get("name", "run")))
        summary = train(cfg, out, ct=args.ct, cxr=args.cxr, device=args.device, stop_after=args.stop_after,
                        resume=not args.no_resume, progress=not args.no_progress, plot=not args.no_plot)
    except (DataSourceError, FileNotFoundError, ValueError) as e:
        print(f"xwin.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if _is_dist():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
