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
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import List, Optional  # noqa: E402

METHODS = ("fdk", "fbp", "sirt", "cgls", "tv")
DEFAULT_VIEWS = {"fdk": 360, "fbp": 360, "sirt": 60, "cgls": 60, "tv": 60}
DEFAULT_ITERS = {"sirt": 20, "cgls": 20, "tv": 20}


class CLIError(Exception):
    """A user error: message printed, exit status 2 (bad options) or 1 (unreadable input / failed run)."""

    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


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
                    "CGLS, TV). Without a CT, the embedded sample chest CT is used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ct", nargs="?", default=None, help="CT volume (NIfTI file or DICOM series folder), HU; "
                   "default: the embedded sample chest CT")
    p.add_argument("--method", choices=METHODS, default="fdk",
                   help="fdk = filtered backprojection (FDK for cone beam, FBP for parallel; fbp is the same); "
                        "sirt = ordered-subsets SIRT; cgls; tv = TV-regularised OS proximal gradient")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone")
    p.add_argument("--views", type=_positive(int, "--views"), default=None,
                   help="number of views (default: 360 for fdk/fbp, 60 for the iterative methods)")
    p.add_argument("--arc", type=_arc, default=360.0,
                   help="scan arc in degrees, or 'short' (180 + fan angle; Parker weights for FDK)")
    p.add_argument("--sid", type=_positive(float, "--sid"), default=1000.0, help="source-isocentre distance (mm)")
    p.add_argument("--sdd", type=_positive(float, "--sdd"), default=1500.0, help="source-detector distance (mm)")
    p.add_argument("--detector", type=_detector, default=None,
                   help="detector ROWSxCOLS (default: just covers the volume in every view)")
    p.add_argument("--pixel-size", type=_positive(float, "--pixel-size"), default=None,
                   help="detector pixel size in mm (default: voxel size x magnification)")
    p.add_argument("--downsample", type=_positive(int, "--downsample"), default=2,
                   help="integer block-average downsampling of the CT before simulating (1 = full resolution)")
    p.add_argument("--projector", choices=("siddon", "trilinear"), default="siddon",
                   help="projector used to simulate (and, for iterative methods, to reconstruct)")
    p.add_argument("--filter", choices=FILTERS, default="ram-lak", help="FDK/FBP ramp filter window")
    p.add_argument("--cutoff", type=_positive(float, "--cutoff"), default=1.0,
                   help="FDK/FBP filter cutoff, fraction of Nyquist (0, 1]")
    p.add_argument("--iterations", type=_positive(int, "--iterations"), default=None,
                   help=f"iterations (maximum) for the iterative methods (default: {DEFAULT_ITERS})")
    p.add_argument("--subsets", type=_positive(int, "--subsets"), default=10,
                   help="ordered subsets for sirt and tv (1 = plain SIRT / proximal gradient)")
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
    return p


# ---------------------------------------------------------------------------------------- stages

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return dev


def load_ct(path: Optional[str]):
    """Volume in HU (the embedded sample when ``path`` is None), with a clear error for unreadable files."""
    from xwin.io import load_volume

    if path is None:
        from xwin.data import sample_ct
        return sample_ct(), "embedded sample chest CT"
    if not os.path.exists(path):
        raise CLIError(f"cannot read CT {path!r}: no such file or folder", status=1)
    try:
        vol = load_volume(path)
    except Exception as exc:  # any reader error becomes one clear line
        raise CLIError(f"cannot read CT {path!r}: {exc}", status=1)
    if vol.data.dim() != 3:
        raise CLIError(f"CT {path!r} must be one 3-D volume, got shape {tuple(vol.data.shape)}", status=1)
    if min(vol.data.shape) < 2:
        raise CLIError(f"CT {path!r} is too small to reconstruct: shape {tuple(vol.data.shape)}", status=1)
    if not bool(vol.data.isfinite().all()):
        raise CLIError(f"CT {path!r} contains NaN or Inf values", status=1)
    return vol, path


def downsample(vol, factor: int):
    """Integer block averaging (keeps the world frame: the new voxel centres are the block centres)."""
    import numpy as np
    import torch.nn.functional as F

    from xwin.io import Volume

    if factor == 1:
        return vol
    if min(vol.data.shape) < factor:
        raise CLIError(f"--downsample {factor} is larger than the CT's smallest dimension {tuple(vol.data.shape)}")
    data = F.avg_pool3d(vol.data.float()[None, None], factor)[0, 0]
    aff = np.array(vol.affine, dtype=np.float64).copy()
    aff[:3, 3] = vol.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + vol.affine[:3, 3]
    aff[:3, :3] = vol.affine[:3, :3] * factor
    return Volume(data.contiguous(), aff)


def scan_geometry(shape, affine, args):
    """Circular orbit about world z through the volume centre, detector just covering the volume."""
    import numpy as np
    import torch

    from xwin.geometry import circular_orbit

    shape = np.asarray(shape, dtype=np.float64)
    A = np.asarray(affine, dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = corners @ A[:3, :3].T + A[:3, 3]
    iso = A[:3, :3] @ ((shape - 1) / 2) + A[:3, 3]
    rel = world - iso
    r = float(np.hypot(rel[:, 0], rel[:, 1]).max())          # bounding cylinder about the orbit axis
    hz = float(np.abs(rel[:, 2]).max())
    sp = np.linalg.norm(A[:3, :3], axis=0)
    cone = args.geometry == "cone"
    if cone:
        if args.sdd <= args.sid:
            raise CLIError(f"--sdd ({args.sdd:g} mm) must be larger than --sid ({args.sid:g} mm)")
        if r >= args.sid:
            raise CLIError(f"the source orbit (--sid {args.sid:g} mm) passes through the volume (radius {r:.0f} mm)")
        mag = args.sdd / args.sid
        halfw = args.sdd * math.tan(math.asin(r / args.sid))
        halfh = hz * args.sdd / (args.sid - r)
        fan = math.asin(r / args.sid)
    else:
        mag, halfw, halfh, fan = 1.0, r, hz, 0.0
    if args.pixel_size is not None:
        ph = pw = float(args.pixel_size)
    else:
        pw = float(min(sp[0], sp[1]) * mag)
        ph = float(sp[2] * mag)
    if args.detector is not None:
        rows, cols = args.detector
    else:
        cols = int(math.ceil(2 * halfw / pw)) + 2
        rows = int(math.ceil(2 * halfh / ph)) + 2
    if cone:                                   # the detector's own half fan angle (its outermost column)
        fan = math.atan((cols - 1) / 2 * pw / args.sdd)
    if args.arc == "short":
        arc = math.pi + 2 * fan
    else:
        arc = math.radians(args.arc)
    V = args.views
    if arc >= 2 * math.pi - 1e-9:
        ang = torch.arange(V, dtype=torch.float64) * (2 * math.pi / V)
    else:
        ang = torch.linspace(0.0, arc, V, dtype=torch.float64)
    g = circular_orbit(ang, rows=rows, cols=cols, pixel_size=(ph, pw), sid=args.sid, sdd=args.sdd,
                       kind=args.geometry, isocenter=tuple(float(x) for x in iso))
    desc = {"kind": args.geometry, "views": V, "arc_deg": math.degrees(arc), "rows": rows, "cols": cols,
            "pixel_size_mm": [ph, pw], "sid_mm": args.sid if cone else None, "sdd_mm": args.sdd if cone else None,
            "isocenter_mm": iso.tolist(), "fan_half_angle_deg": math.degrees(fan),
            "angles_deg": [round(math.degrees(a), 6) for a in ang.tolist()]}
    return g, desc


class Stages:
    """Wall time per stage."""

    def __init__(self):
        self.t = {}

    def run(self, name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        self.t[name] = round(time.perf_counter() - t0, 3)
        return out


def _bar(enabled, total, desc, unit="view"):
    from tqdm.auto import tqdm

    # the voxel-chunked FDK reference reports fractional views done: show whole numbers
    fmt = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, bar_format=fmt)


def simulate(mu, geometry, affine, method, show):
    """Line integrals of ``mu`` view chunk by view chunk (so there is a progress bar)."""
    import torch

    from xwin.kernels import project

    V = geometry.num_views
    chunk = V if mu.device.type == "cuda" else max(1, min(V, 12))
    out = []
    with _bar(show, V, "simulate") as bar:
        for v0 in range(0, V, chunk):
            idx = list(range(v0, min(V, v0 + chunk)))
            out.append(project(mu, geometry[idx], affine=affine, method=method))
            bar.update(len(idx))
    return torch.cat(out, 0)


def add_noise(p, I0: float, seed: int):
    """Poisson counts with mean I0·exp(−p) (counts clamped at 1 photon), back to line integrals."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    lam = (float(I0) * torch.exp(-p.detach().double().cpu()))
    counts = torch.poisson(lam, generator=gen).clamp(min=1.0)
    return (-torch.log(counts / float(I0))).to(p.dtype).to(p.device)


def reconstruct(args, p, geometry, shape, affine, show, noise_norm):
    from . import filters, iterative

    info = {}
    if args.method in ("fdk", "fbp"):
        with _bar(show, geometry.num_views, "FDK backproject" if geometry.kind == "cone" else "FBP backproject") as bar:
            rec, info = filters.fdk(p, geometry, shape, affine=affine, filter=args.filter, cutoff=args.cutoff,
                                    progress=bar.update, return_info=True)
        return rec, info
    from tqdm.auto import tqdm

    def factory(total, desc):
        return tqdm(total=total, desc=desc, unit="it", disable=not show, leave=False, dynamic_ncols=True,
                    file=sys.stderr)

    iters = args.iterations or DEFAULT_ITERS[args.method]
    # the discrepancy principle stops SIRT/CGLS before they fit the noise; TV's prior handles the noise
    # itself, so it runs its iterations (stopping it early measured worse: 37.05 vs 38.81 dB, docs)
    common = dict(affine=affine, iterations=iters, noise_norm=None if args.method == "tv" else noise_norm,
                  method=args.projector, progress=factory, return_info=True)
    if args.method == "sirt":
        return iterative.sirt(p, geometry, shape, subsets=min(args.subsets, geometry.num_views), **common)
    if args.method == "cgls":
        return iterative.cgls(p, geometry, shape, **common)
    return iterative.tv_recon(p, geometry, shape, subsets=min(args.subsets, geometry.num_views),
                              tv_weight=args.tv_weight, **common)


# ---------------------------------------------------------------------------------------- main

def run(args) -> dict:
    import numpy as np
    import torch

    from xwin.geometry import GeometryError
    from xwin.intensity import MU_WATER, hu_to_mu, mu_to_hu
    from xwin.io import Volume, save_volume

    from . import filters, iterative, report

    if args.method in ("fdk", "fbp") and args.views is not None and args.views < 3:
        raise CLIError("--views must be at least 3 for filtered backprojection")
    if not (0 < args.cutoff <= 1):
        raise CLIError(f"--cutoff must be in (0, 1], got {args.cutoff:g}")
    if args.tv_weight < 0 or not math.isfinite(args.tv_weight):
        raise CLIError(f"--tv-weight must be >= 0, got {args.tv_weight:g}")
    args.views = args.views or DEFAULT_VIEWS[args.method]
    if args.method in ("sirt", "tv") and args.subsets > args.views:
        raise CLIError(f"--subsets ({args.subsets}) cannot exceed --views ({args.views})")
    dev = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the torch reference projector runs a Python loop of small tensor ops per voxel step; worker
        # threads cost more at every op than they save (2-core CPU, idle: the default scan's simulation
        # 3.9 s with 1 thread against 10.7 s with 2; 5 OS-SIRT iterations 8.2 s against 19.2 s)
        torch.set_num_threads(1)
    show = not args.quiet
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".xwin_write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"cannot write to --out {args.out!r}: {exc.strerror or exc}", status=1)

    st = Stages()
    ct, source = st.run("load", load_ct, args.ct)
    vol = st.run("downsample", downsample, ct, args.downsample)
    shape = tuple(vol.data.shape)
    affine = vol.affine
    mu = hu_to_mu(vol.data.float()).to(dev)
    try:
        geometry, gdesc = scan_geometry(shape, affine, args)
    except GeometryError as exc:
        raise CLIError(f"bad scan geometry: {exc}")
    int(np.prod(shape))
    if show:
        print(f"xwin.reconstruct: {args.method.upper()} on {source}: {tuple(ct.data.shape)} -> {shape} voxels, "
              f"{args.geometry} beam, {args.views} views over {gdesc['arc_deg']:.1f} deg, detector "
              f"{gdesc['rows']}x{gdesc['cols']}, device {dev}", file=sys.stderr)
    p = st.run("simulate", simulate, mu, geometry, affine, args.projector, show)
    noise_norm = None
    if args.noise:
        p = st.run("noise", add_noise, p, args.noise, args.seed)
        noise_norm = iterative.poisson_noise_norm(p, args.noise)
    rec, info = st.run("reconstruct", reconstruct, args, p, geometry, shape, affine, show, noise_norm)
    rec = rec.float()
    fov = st.run("fov_mask", filters.fov_mask, geometry, shape, affine=affine, device=dev)
    m = st.run("metrics", report.image_metrics, rec, mu, fov)
    rec_hu = mu_to_hu(rec.cpu())
    truth_hu = mu_to_hu(mu.cpu())
    out_nii = os.path.join(args.out, "recon.nii.gz")
    out_png = os.path.join(args.out, "recon.png")
    out_json = os.path.join(args.out, "metrics.json")
    st.run("write_nifti", save_volume, Volume(rec_hu.contiguous(), affine), out_nii)
    title = (f"{args.method.upper()} — {args.geometry} beam, {args.views} views / {gdesc['arc_deg']:.0f}°, "
             f"{'noise-free' if not args.noise else f'Poisson I0={args.noise:g}'} — {source}")
    angles = gdesc["angles_deg"]
    st.run("figure", report.save_figure, out_png, truth_hu.numpy(), rec_hu.numpy(), affine, p.cpu().numpy(), title,
           m, residuals=info.get("residual_history"), view_labels=[f"{a:.0f}°" for a in angles],
           proj_aspect=gdesc["pixel_size_mm"][0] / gdesc["pixel_size_mm"][1])
    info = {k: v for k, v in info.items()}
    metrics = {
        "method": args.method, "input": source, "input_shape": list(ct.data.shape),
        "input_affine": np.asarray(ct.affine).tolist(), "downsample": args.downsample,
        "volume_shape": list(shape), "volume_affine": np.asarray(affine).tolist(),
        "voxel_size_mm": np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist(),
        "mu_water_per_mm": MU_WATER, "projector": args.projector,
        "noise": {"I0": args.noise, "seed": args.seed, "noise_norm": noise_norm} if args.noise else None,
        "metrics": m, "time_s": dict(st.t, total=round(sum(st.t.values()), 3)), "memory": report.peak_memory(),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "scan": gdesc, "geometry": geometry.as_dict(), "reconstruction": info,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "outputs": {"nifti": out_nii, "figure": out_png, "metrics": out_json},
    }
    report.write_json(out_json, metrics)
    return metrics


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
    if "iterations" in rec:
        lines.append(f"  iterations {rec['iterations']} ({rec['stop_reason']}), final relative residual "
                     f"{rec['residual_history'][-1]:.3e}" if rec["residual_history"] else "")
    elif "filter" in rec:
        lines.append(f"  filter     {rec['filter']} (cutoff {rec['cutoff']:g}), {rec['orbit']['redundancy']}")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)          # bad options: argparse prints usage + message, exit status 2
    try:
        mt = run(args)
    except CLIError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(summary(mt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
