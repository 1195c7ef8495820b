"""Threads on a shared machine: time two everyday workloads idle and with competing CPU-bound processes.

    python benchmarks/contention.py                 # both workloads, idle and with 1 competitor (~1-3 min)
    python benchmarks/contention.py --only siddon   # just the 200² Siddon forward

Workloads, each in a fresh subprocess with torch's DEFAULT thread count (OMP_NUM_THREADS and
MKL_NUM_THREADS removed from its environment) and passive OpenMP waiting (OMP_WAIT_POLICY=PASSIVE unless
the caller set a policy; ``--wait-policy`` overrides it for an A/B):

* ``siddon`` — ``xwin.kernels.project`` on the CPU (torch reference), float32, the drr_speed case
  "xwin-torch siddon fwd 200² 1 view": the real chest CT if found (as drr_speed), X-WIN pose, 200×200
  detector of 2.0 mm pixels; median of the runs after a warm-up, 3 input sets in turn.
* ``train`` — ``python -m xwin.train --config tiny --steps N --set val.every=0`` (the public CLI); the per-step
  ``step_time`` of its ``metrics.jsonl``, median over the steps after the first two (the first steps fill
  the render cache and warm up the allocator).

Each workload runs idle, then with ``--competitors`` processes each spinning one core
(``python -c "while True: pass"``) started just before it and stopped after it. A competitor gets its own
session by default, as another user's job would: where the kernel's autogroup scheduling is on (most
desktop and many server kernels), CPU time is shared between sessions first, so a competitor started in
the workload's own session (``--competitor-session same``) halves the workload's share on a busy machine
whatever the workload does. The ratio contended/idle is
compared with issue 10's target (at most 2.5×). ``os.getloadavg()`` is recorded around every run: on a
machine shared with other jobs "idle" is not idle, and the numbers say so.

Outputs: ``<out>/contention.json`` and ``.md`` (default ``benchmarks/results/local/``, which git ignores;
``--write-tables`` writes to ``benchmarks/results/``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (here or in a worker)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402
from report import results_dir  # noqa: E402

TARGET_RATIO = 2.5
RESULT_TAG = "@@CONTENTION@@"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_env(wait_policy: Optional[str]) -> dict:
    """The environment of a workload: default torch threads, the chosen OpenMP wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


# ---------------------------------------------------------------------------------------------- workloads

def siddon_worker(ct_which: str, reps: int, size: int) -> dict:
    """Runs in the workload subprocess: the timed 200² Siddon forward (torch reference, default threads)."""
    import torch

    from xwin.kernels import project

    t0 = time.perf_counter()
    vol, src = C.load_ct(ct_which)
    pixel = 2.0 * 200 / size
    geoms = [C.make_geometry(vol, size, pixel, 1, s) for s in range(3)]
    setup = time.perf_counter() - t0

    def run(i):
        with torch.no_grad():
            return project(vol.data, geoms[i % 3], affine=vol.affine, method="siddon", backend="torch")

    t = time.perf_counter()
    run(0)
    first = time.perf_counter() - t
    times = []
    for i in range(reps):
        t = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - t)
    return {"times_s": times, "first_call_s": first, "setup_s": setup, "torch_threads": torch.get_num_threads(),
            "ct": {"name": src["name"], "note": src["note"], "shape": list(vol.spatial_shape)},
            "detector": f"{size}² @ {pixel:g} mm", "dtype": "float32",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_siddon(args, env) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "siddon", "--ct", args.ct,
           "--reps", str(args.reps), "--size", str(args.size)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len(RESULT_TAG):])


def run_train(args, env) -> dict:
    """The tiny training run through the public CLI; step times from its metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="xwin_contention_") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "xwin.train", "--config", "tiny", "--steps", str(args.train_steps),
               "--out", str(out), "--no-progress", "--no-plot", "--no-resume", "--device", "cpu",
               "--set", "val.every=0"]                   # held-out validation is not part of a step
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=tmp)
        wall = time.perf_counter() - t
        mpath = out / "metrics.jsonl"
        if p.returncode != 0 or not mpath.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
            return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
        rows = [json.loads(ln) for ln in mpath.read_text().splitlines() if ln.strip()]
    steps = [r["step_time"] for r in rows if "step_time" in r]
    return {"times_s": steps[2:] if len(steps) > 3 else steps, "all_step_times_s": steps,
            "render_times_s": [r.get("render_time") for r in rows], "process_wall_s": wall,
            "command": " ".join(["python"] + cmd[1:7] + ["--out", "<tmp>"] + cmd[9:])}


WORKLOADS = {"siddon": run_siddon, "train": run_train}


def default_threads(env: dict) -> Optional[int]:
    """torch's thread count in a workload's environment (a fresh interpreter, as the workloads get)."""
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                       text=True, env=env, timeout=120)
    return int(p.stdout.strip()) if p.returncode == 0 and p.stdout.strip().isdigit() else None


# ---------------------------------------------------------------------------------------------- driver

def start_competitors(n: int, own_session: bool) -> List[subprocess.Popen]:
    """``n`` processes spinning one core each. ``own_session``: each in a new session (setsid), so that Linux's
    autogroup scheduler treats it as another user's job, not as part of this benchmark's session."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=own_session)
             for _ in range(n)]
    time.sleep(0.5)                   # let them get scheduled before the workload starts
    return procs


def stop(procs: List[subprocess.Popen]):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _autogroup() -> Optional[str]:
    """Linux's autogroup setting (1: CPU time is shared fairly between sessions first, then between tasks)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        return None


def measure(name: str, args, competitors: int) -> dict:
    env = child_env(args.wait_policy)
    procs = start_competitors(competitors, args.competitor_session == "new") if competitors else []
    rec = {"competitors": competitors, "loadavg_start": C.loadavg()}
    try:
        rec.update(WORKLOADS[name](args, env))
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {args.timeout:.0f} s"
    finally:
        stop(procs)
    rec["loadavg_end"] = C.loadavg()
    if rec.get("times_s"):
        rec["median_s"] = statistics.median(rec["times_s"])
    return rec


def summarise(name: str, idle: dict, busy: dict) -> dict:
    row = {"workload": name, "idle_median_s": idle.get("median_s"), "contended_median_s": busy.get("median_s"),
           "idle_loadavg": [idle.get("loadavg_start"), idle.get("loadavg_end")],
           "contended_loadavg": [busy.get("loadavg_start"), busy.get("loadavg_end")]}
    if row["idle_median_s"] and row["contended_median_s"]:
        row["ratio"] = row["contended_median_s"] / row["idle_median_s"]
        row["target_met"] = row["ratio"] <= TARGET_RATIO
    return row


def markdown(meta: dict, rows: List[dict]) -> str:
    def s(x):
        return "–" if x is None else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")

    def la(pair):
        return " → ".join("?" if p is None else f"{p[0]:.2f}" for p in pair)

    lines = ["# Threads under contention", "",
             f"{meta['date']} — `{meta['command']}` — {meta['cpu']}, {meta['cpu_count']} CPUs, torch "
             f"{meta['torch']} with its default thread count ({meta['torch_threads_default']}), "
             f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; {meta['competitors']} competing process(es) "
             f"spinning one core each, started in {'a new' if meta['competitor_session'] == 'new' else 'this'} "
             f"session (kernel autogroup: {meta['autogroup']}). 1-minute load average before → after each run.", "",
             "| workload | idle median | load (idle) | contended median | load (contended) | ratio | "
             f"target ≤{TARGET_RATIO}× |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "–"
        met = ("met" if r["target_met"] else "NOT met") if "target_met" in r else "–"
        lines.append(f"| {r['label']} | {s(r['idle_median_s'])} | {la(r['idle_loadavg'])} "
                     f"| {s(r['contended_median_s'])} | {la(r['contended_loadavg'])} | {ratio} | {met} |")
    errs = [f"* {r['label']}: {r['errors']}" for r in rows if r.get("errors")]
    return "\n".join(lines + ([""] + errs if errs else []) + [""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(WORKLOADS), default=None, help="run one workload only")
    ap.add_argument("--ct", default="auto", help="CT for the Siddon case: real | sample | auto | a path")
    ap.add_argument("--size", type=int, default=200, help="Siddon detector size (pixels of 400/size mm)")
    ap.add_argument("--reps", type=int, default=5, help="timed Siddon runs after the warm-up")
    ap.add_argument("--train-steps", type=int, default=12, help="tiny training steps per run")
    ap.add_argument("--competitors", type=int, default=1, help="competing CPU-bound processes")
    ap.add_argument("--competitor-session", default="new", choices=["new", "same"],
                    help="start competitors in a new session (as another job: default) or in this one")
    ap.add_argument("--wait-policy", default=None, choices=["passive", "active"],
                    help="OMP_WAIT_POLICY of the workloads (default: the caller's, else PASSIVE)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per workload run")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/local)")
    ap.add_argument("--write-tables", action="store_true", help="write to benchmarks/results/ (committed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(siddon_worker(args.ct, args.reps, args.size)), flush=True)
        return 0

    t_start = time.perf_counter()
    names = [args.only] if args.only else ["siddon", "train"]
    runs, rows = {}, []
    for name in names:
        idle = measure(name, args, 0)
        busy = measure(name, args, args.competitors)
        runs[name] = {"idle": idle, "contended": busy}
        row = summarise(name, idle, busy)
        row["label"] = ({"siddon": f"Siddon forward {args.size}², 1 view (torch reference, float32)",
                         "train": "tiny training step (`python -m xwin.train --config tiny`)"}[name])
        errs = "; ".join(f"{k}: {r['error']}" for k, r in (("idle", idle), ("contended", busy)) if "error" in r)
        if errs:
            row["errors"] = errs
        rows.append(row)
        print(f"{row['label']}: idle {row['idle_median_s']} s, contended {row['contended_median_s']} s"
              + (f", ratio {row['ratio']:.2f}" if "ratio" in row else "") + (f" [{errs}]" if errs else ""),
              flush=True)

    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            "cpu": C.cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads_default": (runs.get("siddon", {}).get("idle", {}).get("torch_threads")
                                      or default_threads(child_env(args.wait_policy))),
            "omp_wait_policy": (args.wait_policy or os.environ.get("OMP_WAIT_POLICY", "")).upper(),
            "competitors": args.competitors, "competitor_session": args.competitor_session,
            "autogroup": _autogroup(), "source": C.source_info(), "target_ratio": TARGET_RATIO,
            "wall_s": time.perf_counter() - t_start,
            "note": "load averages include every other job on the machine: 'idle' means no competitor started "
                    "by this script, not a quiet machine"}
    out = Path(args.out) if args.out else results_dir(args.write_tables)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "contention.json"
    path.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    md = markdown(meta, rows)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {path} and {path.with_suffix('.md')} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
