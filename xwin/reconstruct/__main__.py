"""``python -m xwin.reconstruct [CT] [options]``: simulate a CT scan with xwin's projector, reconstruct it
(FDK/FBP, SIRT, CGLS or TV) and report how good the result is.

    python -m xwin.reconstruct                         # embedded sample chest CT, FDK, 360 cone-beam views
    python -m xwin.reconstruct ct.nii.gz --method tv --views 60 --noise 1e5 --out runs/tv60

Writes ``recon.nii.gz`` (HU, the input's world frame), ``recon.png`` and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a shared or oversubscribed CPU, spinning worker threads make torch's
# element-wise ops many times slower (measured: TV prox 0.07 s -> 4.5 s with 2 threads on a loaded
# 2-core machine). Must be set before torch is imported; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from typing import List, Optional  # noqa: E402

from .pipeline import DEFAULT_ITERS, DEFAULT_VIEWS, METHODS, RECON_PROJECTORS  # noqa: E402  (imports no torch)


def _positive(kind, name):
    def conv(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {'whole' if kind is int else ''} number, got {s!r}")
        if not (v > 0) or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {s!r}")
        return v
    return conv


def _detector(s):
    try:
        r, c = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--detector must look like ROWSxCOLS (e.g. 128x160), got {s!r}")
    if r < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"--detector sizes must be positive, got {s!r}")
    return r, c


def _arc(s):
    if s.lower() == "short":
        return "short"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arc must be degrees in (0, 360] or 'short', got {s!r}")
    if not (0 < v <= 360):
        raise argparse.ArgumentTypeError(f"--arc must be degrees in (0, 360] or 'short', got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .filters import FILTERS

    prog = "xwin-reconstruct" if os.path.basename(sys.argv[0] or "").startswith("xwin-reconstruct") \
        else "python -m xwin.reconstruct"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Simulate a CT scan of a volume with xwin's projector and reconstruct it (FDK/FBP, SIRT, "
                    "CGLS, TV). Without a CT, the embedded sample chest CT is used. With --projections, reconstruct "
                    "given projections (an RTK/ITK MetaImage stack, NIfTI or .npy) with their scan geometry (RTK "
                    "XML or xwin JSON) instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ct", nargs="?", default=None, help="CT volume (NIfTI file or DICOM series folder), HU; "
                   "default: the embedded sample chest CT")
    p.add_argument("--method", choices=METHODS, default="fdk",
                   help="fdk = filtered backprojection (FDK for cone beam, FBP for parallel; fbp is the same); "
                        "sirt = ordered-subsets SIRT; cgls; tv = TV-regularised OS proximal gradient")
    p.add_argument("--geometry", default="cone", metavar="cone|parallel|FILE",
                   help="simulated scan: cone or parallel beam; with --projections: the scan's geometry file, RTK's "
                        "ThreeDCircularProjectionGeometry XML or xwin's geometry JSON")
    m = p.add_argument_group("given projections (instead of a simulated scan)")
    m.add_argument("--projections", metavar="PROJ", default=None,
                   help="projection stack (V, rows, cols): .mha/.mhd (ITK/RTK), .nii/.nii.gz or .npy; line integrals "
                        "unless --i0")
    m.add_argument("--i0", type=_positive(float, "--i0"), default=None,
                   help="the stack holds intensities: p = -log(I / I0)")
    m.add_argument("--like", metavar="REF", default=None, help="output grid (shape and affine) of this volume")
    m.add_argument("--shape", type=_positive(int, "--shape"), nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="output grid size (with --spacing, about --center)")
    m.add_argument("--spacing", type=_positive(float, "--spacing"), nargs="+", metavar="MM", default=None,
                   help="output voxel size in mm (one or three numbers)")
    m.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="world position (RAS mm) of the output grid's centre (default: the orbit's centre)")
    m.add_argument("--truth", metavar="VOL", default=None, help="volume to measure the reconstruction against")
    m.add_argument("--values", choices=("hu", "mu"), default="hu",
                   help="units of the output NIfTI and of --truth: HU, or attenuation in 1/mm")
    p.add_argument("--views", type=_positive(int, "--views"), default=None,
                   help="number of views (default: 360 for fdk/fbp, 60 for the iterative methods)")
    p.add_argument("--arc", type=_arc, default=360.0,
                   help="scan arc in degrees, or 'short' (180 + fan angle; Parker weights for FDK)")
    p.add_argument("--sid", type=_positive(float, "--sid"), default=1000.0, help="source-isocentre distance (mm)")
    p.add_argument("--sdd", type=_positive(float, "--sdd"), default=1500.0, help="source-detector distance (mm)")
    p.add_argument("--detector", type=_detector, default=None,
                   help="detector ROWSxCOLS (default: just covers the volume in every view)")
    p.add_argument("--pixel-size", type=_positive(float, "--pixel-size"), default=None,
                   help="detector pixel size in mm (default: voxel size x magnification); with --projections: the "
                        "pixel size of a .npy stack under an RTK geometry")
    p.add_argument("--downsample", type=_positive(int, "--downsample"), default=2,
                   help="integer block-average downsampling of the CT before simulating (1 = full resolution)")
    p.add_argument("--projector", choices=("siddon", "trilinear"), default="siddon",
                   help="projector used to simulate (and, on a GPU, by the iterative methods to reconstruct)")
    p.add_argument("--recon-projector", choices=RECON_PROJECTORS, default="auto",
                   help="operator of the iterative methods: auto = joseph on the CPU (RTK's Joseph operator, "
                        "fast there), --projector on a GPU")
    p.add_argument("--filter", choices=FILTERS, default="ram-lak", help="FDK/FBP ramp filter window")
    p.add_argument("--cutoff", type=_positive(float, "--cutoff"), default=1.0,
                   help="FDK/FBP filter cutoff, fraction of Nyquist (0, 1]")
    p.add_argument("--iterations", type=_positive(int, "--iterations"), default=None,
                   help=f"iterations (maximum) for the iterative methods (default: {DEFAULT_ITERS})")
    p.add_argument("--subsets", type=_positive(int, "--subsets"), default=None,
                   help="ordered subsets for sirt and tv (1 = plain SIRT / proximal gradient; default: 10, or the "
                        "number of views if fewer)")
    p.add_argument("--momentum", action="store_true",
                   help="sirt/tv: Nesterov extrapolation between passes (faster on consistent data; use with few "
                        "iterations or --noise's discrepancy stop on inconsistent data)")
    p.add_argument("--tv-weight", type=float, default=1e-5,
                   help="TV weight in 1/mm: the ROF weight of each proximal step (1e-5 /mm is about 0.5 HU)")
    p.add_argument("--noise", type=_positive(float, "--noise"), default=None, metavar="I0",
                   help="Poisson noise: photons per pixel I0 on I0*exp(-p) (default: noise-free); sirt and cgls "
                        "then stop by the discrepancy principle")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=_positive(int, "--threads"), default=None,
                   help="torch CPU threads (default on the CPU: 1, or OMP_NUM_THREADS if set)")
    p.add_argument("--out", default="recon_out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--from-model", metavar="CKPT", default=None,
                   help="a different tool: reconstruct a CT from one radiograph with a trained X-WIN model "
                        "(python -m xwin.reconstruct --from-model CKPT --image X.dcm | --ct CT.nii.gz --out DIR; "
                        "its own options: --from-model CKPT --help)")
    return p


# ---------------------------------------------------------------------------------------- run

def run(args) -> dict:
    """The run the parsed options ask for (see :mod:`xwin.reconstruct.pipeline` and
    :mod:`xwin.reconstruct.measured`); returns its metrics."""
    from xwin.errors import XwinError

    from .pipeline import simulate_and_reconstruct

    if args.projections is not None:
        return run_measured(args)
    if args.geometry not in ("cone", "parallel"):
        raise XwinError(f"--geometry must be cone or parallel for a simulated scan, got {args.geometry!r} "
                        "(a geometry file goes with --projections)")
    given = [o for o in ("like", "shape", "spacing", "center", "truth", "i0") if getattr(args, o) is not None]
    if given:
        raise XwinError(f"--{given[0]} goes with --projections (reconstructing given projections)")

    args.views = args.views or DEFAULT_VIEWS.get(args.method)
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "from_model"}
    return simulate_and_reconstruct(
        args.ct, method=args.method, kind=args.geometry, views=args.views, arc=args.arc, sid=args.sid,
        sdd=args.sdd, detector=args.detector, pixel_size=args.pixel_size, downsample=args.downsample,
        projector=args.projector, filter=args.filter, cutoff=args.cutoff, iterations=args.iterations,
        subsets=args.subsets, tv_weight=args.tv_weight, noise=args.noise, seed=args.seed, device=args.device,
        threads=args.threads, out=args.out, show=not args.quiet, options=options, recon_projector=args.recon_projector,
        momentum=args.momentum)


def run_measured(args) -> dict:
    """``--projections``: reconstruct the given stack (see :func:`xwin.reconstruct.measured.reconstruct_measured`)."""
    from xwin.errors import XwinError

    from .measured import reconstruct_measured

    if args.ct is not None:
        raise XwinError("give either a CT to simulate or --projections, not both")
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "from_model"}
    return reconstruct_measured(
        args.projections, args.geometry, like=args.like, shape=args.shape, spacing=args.spacing, center=args.center,
        method=args.method, i0=args.i0, pixel_size=args.pixel_size, truth=args.truth, values=args.values,
        filter=args.filter, cutoff=args.cutoff, iterations=args.iterations, subsets=args.subsets,
        tv_weight=args.tv_weight, projector=args.projector, device=args.device, threads=args.threads, out=args.out,
        show=not args.quiet, options=options, recon_projector=args.recon_projector, momentum=args.momentum)


def summary_measured(mt: dict) -> str:
    rec, t, m = mt["reconstruction"], mt["time_s"], mt["metrics"]
    lines = [f"xwin.reconstruct — {mt['method'].upper()} of given projections {mt['input']['path']}",
             f"  data       {mt['input']['shape_v_rows_cols'][0]} views of {mt['input']['shape_v_rows_cols'][1]}x"
             f"{mt['input']['shape_v_rows_cols'][2]}, {mt['geometry']['kind']} beam, geometry "
             f"{mt['geometry_file']['format']} ({mt['geometry_file']['path']})"
             + (f", intensities with I0 = {mt['input']['i0']:g}" if "i0" in mt["input"] else ""),
             f"  volume     {tuple(mt['volume_shape'])} voxels of "
             f"{' x '.join(f'{v:.2f}' for v in mt['voxel_size_mm'])} mm (grid from {mt['grid']['from']})"]
    lines += _method_lines(rec)
    lines.append("  time       " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
                 + f"  | total {t['total']:.1f} s")
    lines.append(f"  memory     peak RSS {mt['memory']['peak_rss_mib']:.0f} MiB")
    if m:
        lines.append(f"  quality    PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']}, RMSE {m['rmse_hu']:.1f} HU "
                     f"(over {m['fov_voxels']} FOV voxels) against {mt['truth']}")
    o = mt["outputs"]
    lines.append(f"  outputs    {o['nifti']} ({mt['values'].upper()}), {o['figure']}, {o['metrics']}")
    return "\n".join(lines)


def _method_lines(rec: dict) -> list:
    if "iterations" in rec:
        if not rec["residual_history"]:
            return []
        op = f", {rec['projector']} operator" if rec.get("projector") else ""
        return [f"  iterations {rec['iterations']} ({rec['stop_reason']}){op}, final relative residual "
                f"{rec['residual_history'][-1]:.3e}"]
    if "filter" in rec:
        return [f"  filter     {rec['filter']} (cutoff {rec['cutoff']:g}), {rec['orbit']['redundancy']}"]
    return []


def summary(mt: dict) -> str:
    m, t, s = mt["metrics"], mt["time_s"], mt["scan"]
    rec = mt["reconstruction"]
    lines = [
        f"xwin.reconstruct — {mt['method'].upper()} of {mt['input']}",
        f"  volume     {tuple(mt['input_shape'])} -> {tuple(mt['volume_shape'])} voxels of "
        f"{' x '.join(f'{v:.2f}' for v in mt['voxel_size_mm'])} mm (downsample {mt['downsample']})",
        f"  scan       {s['kind']} beam, {s['views']} views over {s['arc_deg']:.1f} deg, detector {s['rows']}x"
        f"{s['cols']} of {s['pixel_size_mm'][0]:.2f}x{s['pixel_size_mm'][1]:.2f} mm"
        + (f", SID {s['sid_mm']:g} / SDD {s['sdd_mm']:g} mm" if s["sid_mm"] else ""),
        f"  data       {mt['projector']} projector, "
        + ("noise-free" if not mt["noise"] else f"Poisson noise I0 = {mt['noise']['I0']:g}"),
    ]
    lines += _method_lines(rec)
    lines.append("  time       " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
                 + f"  | total {t['total']:.1f} s")
    mem = mt["memory"]
    lines.append(f"  memory     peak RSS {mem['peak_rss_mib']:.0f} MiB"
                 + (f", peak CUDA {mem['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in mem else ""))
    dr = m["data_range"]
    lines.append(f"  quality    PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']}, RMSE {m['rmse_hu']:.1f} HU "
                 f"(over {m['fov_voxels']} FOV voxels; data range {dr['hu'][0]:.0f}..{dr['hu'][1]:.0f} HU)")
    o = mt["outputs"]
    lines.append(f"  outputs    {o['nifti']}, {o['figure']}, {o['metrics']}")
    return "\n".join(lines)


def _from_model(argv: List[str]) -> int:
    """``--from-model``: hand the whole command line to :func:`xwin.reconstruct.from_model.main`."""
    try:
        # import_module consults sys.modules (``from . import`` would take a package attribute first)
        from_model = importlib.import_module(__package__ + ".from_model")
    except ImportError as exc:
        print(f"python -m xwin.reconstruct: error: --from-model is not available in this installation "
              f"(xwin.reconstruct.from_model cannot be imported: {exc})", file=sys.stderr)
        return 2
    return int(from_model.main(argv) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    from xwin.errors import XwinError
    from xwin.io import XwinIOError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--from-model" in argv:
        return _from_model(argv)
    parser = build_parser()
    args = parser.parse_args(argv)          # bad options: argparse prints usage + message, exit status 2
    try:
        mt = run(args)
    except XwinIOError as exc:              # unreadable input or unwritable output
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except XwinError as exc:                # bad options found once the data is known
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(summary_measured(mt) if args.projections is not None else summary(mt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
