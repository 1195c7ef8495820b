"""``python -m xwin.register CT --xray TARGET --init INIT.json --out DIR``: 2D/3D rigid registration.

Finds the rigid motion of the imaging geometry INIT.json (xwin's geometry JSON, world mm of the CT's
frame) that makes the CT's DRR match TARGET, and writes ``DIR/result.json`` (final geometry in the same
schema, the pose change, the loss curve, seconds), ``DIR/geometry.json`` (the final geometry alone, usable
as a next ``--init``), ``DIR/overlay.png`` (target, DRR at the initial and at the final pose, the final
DRR's edges over the target) and ``DIR/curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

__all__ = ["main", "build_parser", "load_target"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xwin.register", description=(
        "2D/3D registration: find the pose of the imaging geometry INIT whose DRR of the CT matches an X-ray. "
        "Writes DIR/result.json, DIR/geometry.json, DIR/overlay.png and DIR/curve.png."))
    ap.add_argument("ct", help="CT volume (NIfTI, DICOM series folder, MetaImage), in HU unless --ct-units mu")
    ap.add_argument("--xray", required=True, metavar="TARGET",
                    help="target image: a radiograph (DICOM/PNG/TIFF, bright = dense) or a .npy array (rows, cols) "
                         "or (views, rows, cols) of line integrals or intensities")
    ap.add_argument("--init", required=True, metavar="INIT.json",
                    help='initial geometry, xwin JSON {"type": "cone"|"parallel", "rows", "cols", "source"|"direction", '
                         '"center", "u", "v"} in world mm of the CT (also under a "geometry" key)')
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    ap.add_argument("--ct-units", choices=("hu", "mu"), default="hu", help="CT values: HU (default) or μ in 1/mm")
    ap.add_argument("--target-kind", choices=("auto", "integrals", "intensity"), default="auto",
                    help="'intensity': a .npy of transmitted intensities I ∝ exp(−∫μ), turned into −log(I/max I); "
                         "'integrals' / 'auto': used as given (bright = dense)")
    ap.add_argument("--similarity", default="ncc+gncc", choices=("ncc+gncc", "ncc", "gncc", "mncc"),
                    help="image similarity (default: half global NCC, half gradient NCC)")
    ap.add_argument("--method", default="siddon", choices=("siddon", "trilinear"), help="projector (default siddon)")
    ap.add_argument("--optimizer", default="auto", choices=("auto", "lm", "adam"),
                    help="'lm': Levenberg-Marquardt on the DRR's pose Jacobian (Siddon with ncc/gncc/ncc+gncc); "
                         "'adam': gradient steps; 'auto' (default): lm where it applies, else adam")
    ap.add_argument("--levels", default=None, metavar="W:N,...",
                    help="coarse-to-fine levels as detector-width:iterations (default: lm 8:10,16:15,64:8,FULL:25; "
                         "adam 32:80,64:50,128:30)")
    ap.add_argument("--lr-rotation", type=float, default=1.0, help="Adam step for the rotation, degrees (default 1)")
    ap.add_argument("--lr-translation", type=float, default=2.0, help="Adam step for the translation, mm (default 2)")
    ap.add_argument("--pivot", default=None, metavar="X,Y,Z", help="rotation centre, world mm (default: CT centre)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--no-figures", action="store_true", help="skip overlay.png and curve.png")
    return ap


def load_target(path: str, kind: str = "auto"):
    """(V, rows, cols) float32 tensor from a .npy file or a radiograph."""
    import torch

    from xwin.errors import XwinError
    from xwin.io import load_radiograph

    p = Path(path)
    if p.suffix.lower() == ".npy":
        if not p.is_file():
            raise XwinError(f"cannot read target {path!r}: no such file")
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise XwinError(f"cannot read target {path!r}: {exc}") from None
        if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.number):
            raise XwinError(f"target {path!r} must be a numeric (rows, cols) or (views, rows, cols) array, "
                            f"got {arr.dtype} {arr.shape}")
        t = torch.as_tensor(arr.astype(np.float32))
        if kind == "intensity":
            t = -torch.log(t.clamp_min(1e-12) / t.max().clamp_min(1e-12))
    else:
        t = load_radiograph(p).to(torch.float32)
    return t if t.ndim == 3 else t[None]


def _parse_levels(text: Optional[str], cols: int):
    from xwin.errors import XwinError

    from .core import default_levels

    if text is None:
        return None
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
        assert pairs and all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in pairs)
    except (ValueError, AssertionError):
        raise XwinError(f"--levels must look like 32:80,64:60,128:40 (detector width:iterations), got {text!r}") from None
    return default_levels(cols, [p[0] for p in pairs], [p[1] for p in pairs])


def _display(img):
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def _edges(img):
    import torch

    from .similarity import _sobel

    x = torch.as_tensor(img, dtype=torch.float32)[None, None]
    gx, gy = _sobel(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"))
    mag = (gx * gx + gy * gy).sqrt()[0, 0].numpy()
    return mag > np.percentile(mag, 90)


def write_figures(out: Path, target, drr_init, drr_final, losses, level_of_step) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, a, b = (_display(np.asarray(x, dtype=np.float64)) for x in (target, drr_init, drr_final))
    fig, ax = plt.subplots(1, 4, figsize=(16, 4.4))
    for axis, img, title in zip(ax[:3], (t, a, b), ("target", "DRR at the initial pose", "DRR at the result")):
        axis.imshow(img, cmap="gray")
        axis.set_title(title)
    rgb = np.stack([t, t, t], -1)
    e_init, e_final = _edges(a), _edges(b)
    rgb[e_init] = [0.2, 0.5, 1.0]
    rgb[e_final] = [1.0, 0.2, 0.1]
    ax[3].imshow(rgb)
    ax[3].set_title("edges over the target: initial (blue), result (red)")
    for axis in ax:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out / "overlay.png", dpi=110)
    plt.close(fig)
    fig, axis = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(losses) + 1)
    axis.semilogy(steps, np.maximum(np.asarray(losses), 1e-8))
    for k in range(1, len(level_of_step)):
        if level_of_step[k] != level_of_step[k - 1]:
            axis.axvline(k + 0.5, color="gray", lw=0.8, ls="--")
    axis.set_xlabel("DRR render (dashed: next resolution level)")
    axis.set_ylabel("1 − similarity")
    axis.set_title("registration loss")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    import torch

    from xwin.geometry import Geometry
    from xwin.intensity import hu_to_mu
    from xwin.io import load_volume
    from xwin.kernels import project

    from .core import register

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    init = Geometry.from_json(Path(args.init))
    target = load_target(args.xray, args.target_kind)
    ct = load_volume(args.ct)
    vol = ct.data if ct.data.ndim == 3 else ct.data[0]
    mu = (hu_to_mu(vol) if args.ct_units == "hu" else vol).to(torch.float32).contiguous()
    pivot = None
    if args.pivot is not None:
        from xwin.errors import XwinError

        try:
            pivot = [float(x) for x in args.pivot.split(",")]
            assert len(pivot) == 3
        except (ValueError, AssertionError):
            raise XwinError(f"--pivot must be three numbers X,Y,Z in mm, got {args.pivot!r}") from None
    levels = _parse_levels(args.levels, init.cols)
    from .core import _check_target, resolve_optimizer

    _check_target(target, init)          # one-line errors before anything is written
    resolve_optimizer(args.optimizer, args.method, args.similarity)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = register(mu, target, init, affine=ct.affine, levels=levels, similarity=args.similarity, method=args.method,
                   optimizer=args.optimizer, lr_rotation_deg=args.lr_rotation, lr_translation_mm=args.lr_translation, pivot=pivot,
                   progress=not args.no_progress)
    d = res.to_dict()
    d.update(ct=str(args.ct), target=str(args.xray), init_geometry=json.loads(init.to_json()), requested_method=args.method)
    (out / "result.json").write_text(json.dumps(d, indent=1))
    (out / "geometry.json").write_text(res.geometry.to_json())
    if not args.no_figures:
        with torch.no_grad():
            a = project(mu, init, affine=ct.affine)[0].numpy()
            b = project(mu, res.geometry, affine=ct.affine)[0].numpy()
        write_figures(out, target[0].numpy(), a, b, res.losses, res.level_of_step)
    print(f"registered in {res.seconds:.1f} s ({len(res.losses)} DRR renders): rotation "
          f"{np.degrees(float(res.rotation.norm())):.3f} deg, translation {float(res.translation.norm()):.3f} mm, "
          f"loss {res.losses[0]:.4f} -> {res.final_loss:.4f} (last accepted, at the finest level); status {res.status}"
          + ("" if res.method == args.method else f" (fell back to {res.optimizer} on the {res.method} projector)")
          + f"; wrote {out / 'result.json'}")
    if res.status in ("zero_gradient", "diverged"):
        print(f"error: the registration failed ({res.status}); the result in {out} is not a registered pose", file=sys.stderr)
        return 3
    if not res.converged:
        print(f"warning: the registration did not converge ({res.status})", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from xwin.errors import XwinError

    try:
        return run(args)
    except XwinError as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
