"""2D/3D registration benchmark: K random trials on a CT, xwin.register and (when installed) DiffDRR 0.6.1.

Per trial: a random true C-arm pose (cone beam, SDD 1020 mm, source 700 mm from the CT centre; yaw uniform in
±45°, pitch ±10°, roll ±5°), the target = xwin's Siddon DRR (line integrals of μ) there, and an initial pose =
the true one moved by a random rotation about the CT centre (uniform random axis, angle uniform in [0, R]°)
and a random translation (uniform random direction, length uniform in [0, T] mm). Success: mTRE < 1 mm, the
mean displacement of 8 CT points (the centres of the CT box's octants) between the true and the found camera
frames (:func:`xwin.pose.mtre_geometries`). Reported: success rate, median mTRE, median seconds per
registration (wall clock, and the process's CPU time, which a shared machine disturbs less) and steps (DRR
renders with their derivatives: one per Adam step, one per tried Levenberg-Marquardt step), for xwin
(``xwin.register.register`` with its defaults, Levenberg-Marquardt; ``--xwin-optimizer adam`` for its Adam) and,
on the same trials, DiffDRR's ``Registration`` (axis-angle parameters) with its
``MultiscaleNormalizedCrossCorrelation2d`` (patches [None, 13], weights [0.5, 0.5]), Adam, its Siddon renderer
at the target's resolution.

    python benchmarks/registration.py [--ct sample|phantom[:SEED]|PATH] [--trials 5] [--rot 10] [--trans 10] [--size 128]
                                      [--seed 0] [--diffdrr auto|off] [--diffdrr-steps 150] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def load_ct(which: str):
    from xwin.data import sample_ct
    from xwin.intensity import hu_to_mu
    from xwin.io import load_volume

    if which == "sample":
        ct = sample_ct()
    elif which.startswith("phantom"):
        from xwin.phantom import chest_phantom

        seed = int(which.split(":", 1)[1]) if ":" in which else 0
        ct = chest_phantom(shape=(128, 128, 128), spacing=(3.0, 3.0, 3.0), seed=seed)
    else:
        ct = load_volume(which)
    data = ct.data if ct.data.ndim == 3 else ct.data[0]
    return hu_to_mu(data).float().contiguous(), np.asarray(ct.affine, dtype=np.float64)


def make_trials(mu, affine, k, rot, trans, size, seed):
    from xwin.geometry import xwin_pose
    from xwin.pose import apply_pose, random_pose, volume_center

    gen = torch.Generator().manual_seed(seed)
    c = volume_center(mu.shape, affine)
    uni = lambda a: (2 * float(torch.rand((), generator=gen, dtype=torch.float64)) - 1) * a
    trials = []
    for _ in range(k):
        truth = xwin_pose(uni(45.0), uni(10.0), uni(5.0), size=size, pixel_size=400.0 / size,
                          isocenter=tuple(c.tolist()))
        w0, t0 = random_pose(rot, trans, gen)
        trials.append(dict(truth=truth, init=apply_pose(truth, w0, t0, c), rot_deg=float(np.degrees(float(w0.norm()))),
                           trans_mm=float(t0.norm())))
    return trials, c


def run_xwin(mu, affine, target, init, optimizer="auto"):
    from xwin.register import register

    t, c = time.perf_counter(), time.process_time()
    res = register(mu, target, init, affine=affine, optimizer=optimizer)
    return res.geometry, time.perf_counter() - t, len(res.losses), time.process_time() - c


class DiffDRRRegistration:
    """DiffDRR 0.6.1: ``Registration(DRR, rotation, translation, "axis_angle")``, multiscale NCC, Adam."""

    def __init__(self, mu, affine, truth, steps, lr_rotation=1e-2, lr_translation=1.0, patience=20):
        sys.path.insert(0, str(HERE))
        import adapters
        from xwin.io import Volume

        adapters._stub_torchio()
        _stub_unused_diffdrr_imports()
        from diffdrr.metrics import MultiscaleNormalizedCrossCorrelation2d
        from diffdrr.pose import RigidTransform
        from diffdrr.registration import Registration

        self.adapters, self.RigidTransform, self.Registration = adapters, RigidTransform, Registration
        self.renderer = adapters.DiffDRRRenderer(Volume(mu, affine), truth, "siddon", torch.device("cpu"))
        self.ray_error_mm = self.renderer.check_rays(truth)
        self.loss = MultiscaleNormalizedCrossCorrelation2d([None, 13], [0.5, 0.5])
        self.steps, self.lr = steps, (lr_rotation, lr_translation)
        self.patience = patience

    def __call__(self, target, init, rows, cols):
        from xwin.geometry import Geometry

        t0, c0 = time.perf_counter(), time.process_time()
        T, *_ = self.adapters.camera_to_world(init, 0)
        rot, trans = self.RigidTransform(T.to(torch.float32)).convert("axis_angle")
        reg = self.Registration(self.renderer.drr, rot.clone(), trans.clone(), parameterization="axis_angle")
        opt = torch.optim.Adam([{"params": [reg.rotation], "lr": self.lr[0]},
                                {"params": [reg.translation], "lr": self.lr[1]}])
        tgt = target[None].to(torch.float32)                       # (1, 1, H, W)
        best, since, steps = float("inf"), 0, 0
        for _ in range(self.steps):
            opt.zero_grad()
            loss = -self.loss(reg(), tgt).mean()
            loss.backward()
            opt.step()
            steps += 1
            lv = float(loss.detach())
            if lv < best - 1e-6:
                best, since = lv, 0
            else:
                since += 1
                if since >= self.patience:
                    break
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():
            src, tgt_pts = self.renderer.drr.detector(reg.pose, None)
        pix = tgt_pts[0].double().reshape(rows, cols, 3)
        u, v = pix[0, 1] - pix[0, 0], pix[1, 0] - pix[0, 0]
        center = pix[0, 0] + (cols - 1) / 2 * u + (rows - 1) / 2 * v
        return Geometry.cone(src[0, 0].double(), center, u, v, rows, cols), seconds, steps, cpu


def _stub_unused_diffdrr_imports():
    """diffdrr.registration imports timm (for PoseRegressor) and diffdrr.metrics imports torchvision's
    gaussian_blur and kornia's histograms (for other metrics) at module level; none runs on this path.
    Where those packages are missing, empty stand-ins let the modules import (the real ones win)."""
    import importlib.machinery
    import importlib.util
    import types

    def stub(name, **attrs):
        top = name.split(".")[0]
        if name in sys.modules or (top not in sys.modules and importlib.util.find_spec(top) is not None):
            return
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m

    def missing(*a, **k):
        raise RuntimeError("stub: not installed")

    stub("timm", create_model=missing)
    for name in ("torchvision", "torchvision.transforms"):
        stub(name)
    stub("torchvision.transforms.functional", gaussian_blur=missing)
    for name in ("kornia", "kornia.enhance"):
        stub(name)
    stub("kornia.enhance.histogram", marginal_pdf=missing, joint_pdf=missing)


def diffdrr_available():
    import importlib.util

    if importlib.util.find_spec("diffdrr") is None:
        return "diffdrr is not installed"
    try:
        sys.path.insert(0, str(HERE))
        import adapters

        adapters._stub_torchio()
        _stub_unused_diffdrr_imports()
        import diffdrr.metrics  # noqa: F401
        import diffdrr.registration  # noqa: F401
    except Exception as exc:  # report why, run xwin alone
        return f"diffdrr does not import: {type(exc).__name__}: {exc}"
    return None


def summary(rows):
    ok = [r for r in rows if r is not None]
    if not ok:
        return None
    return {"trials": len(ok), "success_rate": sum(r["mtre_mm"] < 1.0 for r in ok) / len(ok),
            "median_mtre_mm": statistics.median(r["mtre_mm"] for r in ok),
            "median_seconds": statistics.median(r["seconds"] for r in ok),
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
            "median_steps": statistics.median(r["steps"] for r in ok)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", default="sample", help="'sample' (the embedded 128×128×133 chest CT), 'phantom[:SEED]' "
                    "(xwin.phantom.chest_phantom, 128³ voxels of 3 mm) or a CT path")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rot", type=float, default=10.0, help="largest initial rotation error R (degrees)")
    ap.add_argument("--trans", type=float, default=10.0, help="largest initial translation error T (mm)")
    ap.add_argument("--size", type=int, default=128, help="detector rows = cols (pixel 400/size mm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diffdrr", choices=("auto", "off"), default="auto")
    ap.add_argument("--diffdrr-steps", type=int, default=150, help="DiffDRR's iteration budget per trial")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--xwin-optimizer", choices=("auto", "lm", "adam"), default="auto",
                    help="xwin.register's optimiser (auto = Levenberg-Marquardt for Siddon + NCC/gradient NCC)")
    ap.add_argument("--out", default=str(HERE / "results" / "local" / "registration.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from xwin.kernels import project
    from xwin.pose import mtre_geometries, volume_corners

    mu, affine = load_ct(args.ct)
    trials, c = make_trials(mu, affine, args.trials, args.rot, args.trans, args.size, args.seed)
    points = c + (volume_corners(mu.shape, affine) - c) * 0.5
    why = "turned off" if args.diffdrr == "off" else diffdrr_available()
    dd = None
    rows = {"xwin": [], "diffdrr": []}
    for i, tr in enumerate(trials):
        target = project(mu, tr["truth"], affine=affine)
        init_err = float(mtre_geometries(tr["init"], tr["truth"], points))
        g, sec, steps, cpu = run_xwin(mu, affine, target, tr["init"], args.xwin_optimizer)
        rows["xwin"].append(dict(mtre_mm=float(mtre_geometries(g, tr["truth"], points)), seconds=sec, steps=steps,
                                 cpu_seconds=cpu, init_mtre_mm=init_err))
        line = (f"trial {i}: init {init_err:.2f} mm | xwin {rows['xwin'][-1]['mtre_mm']:.3f} mm {sec:.1f} s "
                f"(cpu {cpu:.1f} s, {steps} steps)")
        if why is None:
            if dd is None:
                dd = DiffDRRRegistration(mu, affine, tr["truth"], args.diffdrr_steps)
            g2, sec2, steps2, cpu2 = dd(target, tr["init"], args.size, args.size)
            rows["diffdrr"].append(dict(mtre_mm=float(mtre_geometries(g2, tr["truth"], points)), seconds=sec2,
                                        steps=steps2, cpu_seconds=cpu2, init_mtre_mm=init_err))
            line += f" | DiffDRR {rows['diffdrr'][-1]['mtre_mm']:.3f} mm {sec2:.1f} s (cpu {cpu2:.1f} s, {steps2} steps)"
        print(line, flush=True)
    result = {"command": "python benchmarks/registration.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "ct": args.ct, "ct_shape": list(mu.shape), "trials": args.trials, "R_deg": args.rot, "T_mm": args.trans,
              "detector": args.size, "seed": args.seed,
              "xwin_optimizer": args.xwin_optimizer, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average_at_end": os.getloadavg(), "xwin": summary(rows["xwin"]),
              "diffdrr": summary(rows["diffdrr"]) if rows["diffdrr"] else {"skipped": why},
              "diffdrr_ray_error_mm": getattr(dd, "ray_error_mm", None), "per_trial": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| implementation | success (mTRE < 1 mm) | median mTRE | median time / registration (CPU time) | median steps |")
    print("|---|---|---|---|---|")
    for name in ("xwin", "diffdrr"):
        s = result[name]
        if s and "skipped" not in s:
            print(f"| {name} | {s['success_rate'] * 100:.0f}% of {s['trials']} | {s['median_mtre_mm']:.3f} mm | "
                  f"{s['median_seconds']:.1f} s ({s['median_cpu_seconds']:.1f} s) | {s['median_steps']:.0f} |")
        else:
            print(f"| {name} | skipped: {(s or {}).get('skipped')} | | | |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
