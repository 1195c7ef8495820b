"""Reconstruction side by side with RTK: the same RTK-simulated projections reconstructed by RTK's CPU
FDK / SART / CG / ADMM-TV and by xwin's FDK / SIRT / CGLS / TV; and xwin's forward projectors against RTK's
Joseph forward projector.

xwin's iterative rows use its Joseph operator (:mod:`xwin.reconstruct.joseph`, what ``python -m
xwin.reconstruct`` uses on the CPU); ``--siddon-rows`` adds the same methods on the Siddon operator and the
trilinear forward projection (the rows of earlier runs, a few minutes more). OS-SIRT and RTK's OS-SART run
with 10 subsets and with ``--subsets`` (default: views / 2, two views per subset) each; OS-SIRT also with
Nesterov momentum between passes (``sirt(..., momentum=True)``).

    python benchmarks/recon_speed.py              # sample CT at 64x64x66 (downsample 2), 120 views
    python benchmarks/recon_speed.py --quick      # downsample 4, 60 views, few iterations (a few minutes)

Needs ``pip install itk-rtk`` (the comparison is the point; without it the script says so and stops).

The volume: the embedded sample chest CT (μ, 1/mm) block-averaged by ``--downsample`` and padded with two
voxels of air (RTK's Joseph projector integrates only between the first and last voxel centres). The scan:
RTK's ThreeDCircularProjectionGeometry, full 360° circle, SID 1000 / SDD 1500 mm, a detector that covers
the volume (``--offset`` shifts it sideways by that many mm: a half-fan scan when about half its width).
RTK simulates the projections with its Joseph projector; both toolkits reconstruct those same projections
onto the volume's grid; the geometry reaches xwin through :func:`xwin.reconstruct.rtk.rtk_to_vector`
(with the stack's origin / spacing / direction, LPS -> RAS).

Reported per method: PSNR / SSIM / RMSE against the truth over the same field of view (voxels seen in
every view), wall time, peak RSS of the process during the method (VmHWM reset before it) and what it
added to the RSS before it. Both toolkits use ``--threads`` CPU threads (ITK's global default and torch's).
Forward projection: RTK Joseph vs xwin Joseph (and its adjoint's time), Siddon and (``--siddon-rows``)
trilinear (step 0.25 voxel), time and agreement (NCC, relative difference to RTK's).

Outputs: a printed table, ``<out>/recon_speed[_quick].json`` and ``.md``; ``<out>`` is
``benchmarks/results/local/`` (git-ignored) unless ``--write-tables`` (``benchmarks/results/``) or ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _ncc(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


class Trace:
    """Per-iteration (iteration, seconds, PSNR) of an xwin method through its ``callback``; the time spent
    in the callback itself is excluded (and subtracted from the row's time)."""

    def __init__(self, truth, mask):
        self.truth = truth[mask].double()
        self.mask = mask
        self.range = float(self.truth.max() - self.truth.min())
        self.t0, self.spent, self.points = 0.0, 0.0, []

    def start(self):
        self.t0, self.spent, self.points = time.perf_counter(), 0.0, []
        return self

    def __call__(self, k, x):
        t = time.perf_counter()
        mse = float(((x[self.mask].double() - self.truth) ** 2).mean())
        self.points.append([k, round(t - self.t0 - self.spent, 3), round(10 * np.log10(self.range ** 2 / mse), 3)])
        self.spent += time.perf_counter() - t


def setup(args):
    """(μ Volume, RTKGeometry, detector frame, rows, cols, description)."""
    from xwin.data import sample_ct
    from xwin.intensity import hu_to_mu
    from xwin.io import Volume
    from xwin.reconstruct.rtk import RTKGeometry, centered_detector_frame
    from xwin.reconstruct.scan import downsample

    ct = downsample(sample_ct(), args.downsample)
    mu = torch.nn.functional.pad(hu_to_mu(ct.data.float()), (2,) * 6)
    aff = ct.affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, 2.0)
    vol = Volume(mu.contiguous(), aff)
    sp = vol.spacing
    sid, sdd = 1000.0, 1500.0
    ext = np.asarray(vol.spatial_shape) * sp
    r = 0.5 * float(np.hypot(ext[0], ext[1]))
    hz = 0.5 * float(ext[2])
    pw = float(min(sp[0], sp[1]) * sdd / sid)
    ph = float(sp[2] * sdd / sid)
    half_w = sdd * np.tan(np.arcsin(r / sid))
    cols = int(np.ceil(2 * half_w / pw)) + 2
    rows = int(np.ceil(2 * hz * sdd / (sid - r) / ph)) + 2
    if args.offset:
        cols = int(np.ceil((half_w + args.offset) / pw)) + 2           # the long side plus the shift
    rg = RTKGeometry(sid=sid, sdd=sdd, gantry=np.arange(args.views) * (360.0 / args.views),
                     proj_offset_x=float(args.offset))
    # the RTK isocentre is the world origin: put the volume's centre there
    vol = Volume(vol.data, vol.affine - np.pad(np.asarray(vol.center_world)[:, None], ((0, 1), (3, 0))))
    frame = centered_detector_frame(rows, cols, (ph, pw))
    desc = {"volume_shape": list(vol.spatial_shape), "voxel_mm": sp.tolist(), "views": args.views,
            "rows": rows, "cols": cols, "pixel_mm": [ph, pw], "sid_mm": sid, "sdd_mm": sdd,
            "detector_offset_mm": args.offset, "source": f"sample CT, downsample {args.downsample}, +2 voxels air"}
    return vol, rg, frame, rows, cols, desc


def timed(fn, *a, **k):
    """(result, seconds, peak RSS MiB during the call, RSS before MiB)."""
    before = C.rss_now_mb()
    C.reset_peak_rss()
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t, C.peak_rss_mb(), before


def run(args) -> dict:
    import itk

    from xwin.kernels import project
    from xwin.reconstruct import cgls, fdk, sirt, tv_recon
    from xwin.reconstruct.joseph import JosephProjector
    from xwin.reconstruct.filters import fov_mask
    from xwin.reconstruct.report import image_metrics
    from xwin.reconstruct.rtk import rtk_to_vector
    from xwin.reconstruct.rtk_itk import require_rtk, rtk_fdk, rtk_forward, rtk_iterative

    torch.set_num_threads(args.threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    require_rtk()
    vol, rg, frame, rows, cols, desc = setup(args)
    g = rtk_to_vector(rg, frame, rows, cols)
    shape, aff = vol.spatial_shape, vol.affine
    # warm-up: ITK loads RTK's projector modules on first use (~40 s here); not part of any timing
    _ = rtk_forward(vol, type(rg)(sid=rg.sid[:1], sdd=rg.sdd[:1], gantry=rg.gantry[:1]), frame, rows, cols)
    p, t_rtk_fp, mem_fp, _ = timed(rtk_forward, vol, rg, frame, rows, cols)
    fwd = [{"name": "RTK Joseph", "seconds": round(t_rtk_fp, 3), "peak_rss_mib": round(mem_fp, 1)}]

    A, t_setup, _, _ = timed(JosephProjector, g, shape, affine=aff)   # ray set-up, once per geometry
    ops = [("xwin joseph", lambda: A(vol.data))]
    ops += [(f"xwin {m}" + (f" (step {st})" if m == "trilinear" else ""),
             lambda m=m, st=st: project(vol.data, g, affine=aff, method=m, step=st))
            for m, st in (("siddon", 0.5),) + ((("trilinear", 0.25),) if args.siddon_rows else ())]
    for name, fn in ops:
        ours, t, mem, _ = timed(fn)
        ours = ours.numpy()
        fwd.append({"name": name, "seconds": round(t, 3), "peak_rss_mib": round(mem, 1),
                    "ncc_vs_rtk": round(_ncc(ours, p), 9), "rel_diff_vs_rtk": float(np.linalg.norm(ours - p) / np.linalg.norm(p))})
        print(fwd[-1], flush=True)
    _, t_bp, mem_bp, _ = timed(A.T, torch.from_numpy(p))
    adjoint = {"name": "xwin joseph adjoint", "seconds": round(t_bp, 3), "peak_rss_mib": round(mem_bp, 1),
               "setup_seconds": round(t_setup, 3)}
    print(adjoint, flush=True)
    mask = fov_mask(g, shape, affine=aff)
    pt = torch.from_numpy(p)
    it = args.iterations
    S = min(args.subsets or max(1, args.views // 2), args.views)
    tw = args.tv_weight

    trace = Trace(vol.data, mask)

    def xwin_rows(op):
        name = "Joseph" if op == "joseph" else op.capitalize()
        kw = dict(affine=aff, iterations=it, method=op)
        return [
            (f"xwin OS-SIRT {name} ({it} it, 10 subsets)",
             lambda: sirt(pt, g, shape, subsets=10, callback=trace.start(), **kw)),
            (f"xwin OS-SIRT {name} ({it} it, {S} subsets)",
             lambda: sirt(pt, g, shape, subsets=S, callback=trace.start(), **kw)),
            (f"xwin OS-SIRT {name} + momentum ({it} it, {S} subsets)",
             lambda: sirt(pt, g, shape, subsets=S, momentum=True, callback=trace.start(), **kw)),
            (f"xwin CGLS {name} ({it} it)", lambda: cgls(pt, g, shape, callback=trace.start(), **kw)),
            (f"xwin TV {name} ({it} it, {S} subsets, {tw:g}/mm)",
             lambda: tv_recon(pt, g, shape, subsets=S, prox_every=max(1, S // 10), tv_weight=tw,
                              callback=trace.start(), **kw)),
        ]

    methods = [("RTK FDK", lambda: rtk_fdk(p, frame, rg, vol).data), ("xwin FDK", lambda: fdk(pt, g, shape, affine=aff))]
    methods += xwin_rows("joseph") + (xwin_rows("siddon") if args.siddon_rows else [])
    methods += [
        (f"RTK OS-SART ({it} it, 10 subsets)", lambda: rtk_iterative("sart", p, frame, rg, vol, iterations=it,
                                                                   subsets=10).data),
        (f"RTK OS-SART ({it} it, {S} subsets)", lambda: rtk_iterative("sart", p, frame, rg, vol, iterations=it,
                                                                    subsets=S).data),
        (f"RTK CG ({it} it)", lambda: rtk_iterative("cg", p, frame, rg, vol, iterations=it).data),
    ]
    if args.admm:
        methods.append((f"RTK ADMM-TV ({args.admm} AL it x 3 CG)", lambda: rtk_iterative(
            "admm-tv", p, frame, rg, vol, iterations=args.admm, tv_weight=args.admm_alpha).data))
    rows_out = []
    for name, fn in methods:
        trace.points, trace.spent = [], 0.0
        rec, t, mem, before = timed(fn)
        m = image_metrics(rec.float(), vol.data, mask)
        rows_out.append({"name": name, "seconds": round(t - trace.spent, 3), "peak_rss_mib": round(mem, 1),
                         "added_rss_mib": round(mem - before, 1), "psnr_db": m["psnr_db"], "ssim": m["ssim"],
                         "rmse_hu": m["rmse_hu"]})
        if trace.points:
            rows_out[-1]["trace_iteration_seconds_psnr"] = trace.points
        print(rows_out[-1], flush=True)
    return {"scan": desc, "threads": args.threads, "iterations": it, "subsets": S, "forward": fwd, "adjoint": adjoint,
            "reconstruction": rows_out,
            "fov_voxels": int(mask.sum()), "environment": C.environment(torch.device("cpu")),
            "loadavg_end": C.loadavg(), "itk": itk.Version.GetITKVersion()}


def markdown(res: dict) -> str:
    s = res["scan"]
    env = res["environment"]
    lines = [f"Volume {s['volume_shape']} voxels ({s['source']}), {s['views']} views full circle, detector "
             f"{s['rows']}x{s['cols']} of {s['pixel_mm'][0]:.2f}x{s['pixel_mm'][1]:.2f} mm, SID {s['sid_mm']:g} / SDD "
             f"{s['sdd_mm']:g} mm, detector offset {s['detector_offset_mm']:g} mm; projections simulated by RTK's "
             f"Joseph projector. {env['cpu']} ({env['cpu_count']} cores, shared), {res['threads']} thread(s) for "
             f"both; ITK {res['itk']}, torch {env['torch']}; load average at the end {res['loadavg_end']}. "
             f"PSNR/SSIM over the {res['fov_voxels']} voxels seen in every view.", "",
             "| method | PSNR dB | SSIM | RMSE HU | time s | peak RSS MiB (+added) |", "|---|---|---|---|---|---|"]
    for r in res["reconstruction"]:
        lines.append(f"| {r['name']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['rmse_hu']:.1f} | {r['seconds']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} (+{r['added_rss_mib']:.0f}) |")
    rtk = [r for r in res["reconstruction"] if r["name"].startswith("RTK") and "FDK" not in r["name"]]
    traced = [r for r in res["reconstruction"] if "trace_iteration_seconds_psnr" in r]
    if rtk and traced:
        best = max(rtk, key=lambda r: r["psnr_db"])
        lines += ["", f"Time for each xwin iterative method to reach RTK's best PSNR here ({best['psnr_db']:.2f} dB, "
                  f"{best['name']}, {best['seconds']:.2f} s), from its per-iteration trace (time since the call, "
                  "set-up included, PSNR evaluation excluded):", "",
                  "| xwin method | reached at iteration | time s | vs RTK's time |", "|---|---|---|---|"]
        for r in traced:
            hit = next((pt for pt in r["trace_iteration_seconds_psnr"] if pt[2] >= best["psnr_db"]), None)
            lines.append(f"| {r['name']} | " + (f"{hit[0]} | {hit[1]:.2f} | {hit[1] / best['seconds']:.2f}x |" if hit
                                               else "not reached | — | — |"))
    lines += ["", "| forward projector | time s | NCC vs RTK | rel. diff vs RTK | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in res["forward"]:
        lines.append(f"| {r['name']} | {r['seconds']:.2f} | {r.get('ncc_vs_rtk', '—')} | "
                     f"{r['rel_diff_vs_rtk']:.2e} | {r['peak_rss_mib']:.0f} |" if "ncc_vs_rtk" in r else
                     f"| {r['name']} | {r['seconds']:.2f} | (reference) | — | {r['peak_rss_mib']:.0f} |")
    if "adjoint" in res:
        a = res["adjoint"]
        lines.append(f"| {a['name']} | {a['seconds']:.2f} | — | — | {a['peak_rss_mib']:.0f} |")
        lines.append(f"| xwin joseph ray set-up (once per geometry, not in the rows above) | {a['setup_seconds']:.2f} "
                     "| — | — | — |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="downsample 4, 60 views, 5 iterations")
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--views", type=int, default=120)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--offset", type=float, default=0.0, help="sideways detector shift in mm (half-fan scan)")
    ap.add_argument("--admm", type=int, default=0, help="also RTK ADMM-TV with this many AL iterations")
    ap.add_argument("--admm-alpha", type=float, default=1e-4, help="RTK ADMM-TV regularisation weight")
    ap.add_argument("--subsets", type=int, default=None, help="the second subset count (default: views // 2)")
    ap.add_argument("--tv-weight", type=float, default=1e-5, help="xwin TV weight (1/mm)")
    ap.add_argument("--siddon-rows", action="store_true",
                    help="also xwin's methods on the Siddon operator and the trilinear forward projection")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-tables", action="store_true", help="write to benchmarks/results/ (committed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.downsample, args.views, args.iterations = 4, 60, 5
    try:
        import itk  # noqa: F401
        from itk import RTK  # noqa: F401
    except ImportError:
        print("recon_speed: RTK is not installed (pip install itk-rtk); nothing to compare against", file=sys.stderr)
        return 1
    res = run(args)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / ("" if args.write_tables else "local")
    out.mkdir(parents=True, exist_ok=True)
    stem = "recon_speed" + ("_quick" if args.quick else "") + (f"_offset{args.offset:g}" if args.offset else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
