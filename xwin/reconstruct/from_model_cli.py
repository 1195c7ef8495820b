"""The ``--from-model`` command line, its figure and tables (the pipeline is :mod:`xwin.reconstruct.from_model`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .from_model import HELDOUT_SEED0, METHODS, FromModelError, Pipeline, evaluate_ct, mean_training_ct, reconstruct


# ------------------------------------------------------------------------------------------- figure

def save_figure(path, arrays, title: str, method: str, scale: str, metrics: Optional[dict] = None) -> None:
    """Input, true vs decoded views at up to five yaws, and axial/coronal/sagittal slices of truth,
    reconstruction and error (HU) — without truth (``--image``) only the reconstruction."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from xwin.intensity import mu_to_hu
    from xwin.reconstruct.report import _canonical, _planes, display_axes

    yaws = arrays["yaws"]
    want = [-90, -45, 45, 90, 0]
    picks = sorted({int(np.argmin(np.abs(yaws - w))) for w in want if len(yaws)})[:5]
    has_truth = arrays.get("mu") is not None
    ornt, sp = display_axes(arrays["affine"])
    rec = _canonical(mu_to_hu(arrays["recs"][(scale, method)]).numpy(), ornt)
    rows = [("reconstruction", rec, "gray", (-1000, 600))]
    if has_truth:
        tru = _canonical(mu_to_hu(arrays["mu"]).numpy(), ornt)
        rows = [("truth", tru, "gray", (-1000, 600))] + rows + [("error", rec - tru, "RdBu_r", (-300, 300))]
        if arrays.get("mean_ct") is not None:
            rows.append(("mean training CT", _canonical(mu_to_hu(arrays["mean_ct"]).numpy(), ornt), "gray", (-1000, 600)))
    nview = 2 if arrays.get("p_true") is not None else 1
    ncol = max(len(picks) + 1, 3)
    fig, axs = plt.subplots(nview + len(rows), ncol, figsize=(2.3 * ncol, 2.3 * (nview + len(rows))), squeeze=False)
    for a in axs.flat:
        a.axis("off")
    axs[0, 0].imshow(arrays["context"].numpy(), cmap="gray")
    axs[0, 0].set_title("input (frontal)", fontsize=9)
    ref = arrays["p_true"] if arrays.get("p_true") is not None else arrays["decoded"]
    vmax = float(np.percentile(ref.numpy(), 99.9)) or 1.0
    srcs = [("decoded", arrays["decoded"])] + ([("true", arrays["p_true"])] if nview == 2 else [])
    for r, (lab, views) in enumerate(srcs):
        for c, i in enumerate(picks, start=1):
            axs[r, c].imshow(views[i].numpy(), cmap="gray", vmin=0, vmax=vmax)
            axs[r, c].set_title(f"{lab} yaw {yaws[i]:+.0f}°", fontsize=9)
    for r, (lab, vol, cmap, (lo, hi)) in enumerate(rows, start=nview):
        for c, (img, asp) in enumerate(_planes(vol, sp)):
            axs[r, c].imshow(img, cmap=cmap, vmin=lo, vmax=hi, aspect=asp, interpolation="nearest")
        axs[r, 0].set_title(lab, fontsize=9, loc="left")
    if metrics:
        axs[nview, ncol - 1].text(0, 0.9, "\n".join(metrics_lines(metrics, method, scale)), va="top", fontsize=8,
                                  family="monospace", transform=axs[nview, ncol - 1].transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def metrics_lines(m: dict, method: str, scale: str) -> List[str]:
    v = m["volume_3d"]

    def row(name, key):
        return f"{name:<9}{v[key]['psnr_db']:6.2f} dB {v[key]['ssim']:.3f}"

    out = [f"3D ({method}): PSNR  SSIM", row("model", f"{scale}/{method}"), row("upper", f"true/{method}"),
           row("lower", "lower/mean-training-ct")]
    w = m["views_2d"][scale]
    return out + [f"2D views: {w['psnr_db']:.2f} dB {w['ssim']:.3f}"]


# ------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xwin.reconstruct --from-model",
                                description="A CT from one frontal radiograph with a trained X-WIN world model and "
                                            "its projection decoder.")
    p.add_argument("--from-model", dest="ckpt", required=True, metavar="CKPT",
                   help="world-model checkpoint (RUN/checkpoint.pt; its decoder is RUN/decoder/decoder.pt) or a "
                        "decoder.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct", help="CT (NIfTI / DICOM folder, HU): simulate its frontal view, compare with it")
    src.add_argument("--image", help="a frontal radiograph (PNG/JPEG/TIFF/DICOM, bright = dense)")
    src.add_argument("--heldout", type=int, metavar="N", help="evaluate N held-out phantoms (seeds 200000 + i)")
    p.add_argument("--decoder", default=None, help="decoder.pt (default: next to CKPT)")
    p.add_argument("--methods", default="tv,fdk,fdk-mirror,sirt-prior",
                   help=f"reconstruction methods, comma separated, from {', '.join(METHODS)}; the first is written")
    p.add_argument("--scale", choices=("frontal", "prior"), default=None,
                   help="s of the decoded views: from the input's frontal line integrals (default with --ct) or the "
                        "training prior (the only choice with --image)")
    p.add_argument("--scales", default="frontal,prior", help="with --ct / --heldout: the scales s to evaluate the "
                   "decoded views with, comma separated (frontal, prior); the written volume uses --scale")
    p.add_argument("--yaw-step", type=float, default=None, help="yaw spacing of the predicted views (default: the "
                   "world model's action grid)")
    p.add_argument("--iterations", type=int, default=20, help="iterations of sirt / tv")
    p.add_argument("--out", default="recon_from_model", help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU)")
    return p


def _methods(s: str) -> List[str]:
    ms = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if not ms or bad:
        raise FromModelError(f"--methods must list some of {', '.join(METHODS)}, got {s!r}")
    return ms


def _load_ct(path: str):
    from xwin.reconstruct.scan import load_ct

    vol, _ = load_ct(path)
    return vol


def run_ct(pipe: Pipeline, vol, args, label: str, mean_cache: Optional[dict] = None) -> dict:
    from xwin.decoder import model_grid_ct
    from xwin.intensity import mu_to_hu
    from xwin.io import Volume, save_volume
    from xwin.reconstruct.report import write_json

    methods = _methods(args.methods)
    scale = args.scale or "frontal"
    grid = model_grid_ct(vol, pipe.cfg)
    mean_ct = None
    if mean_cache is not None:           # the lower bound depends only on the grid's axis order and shape
        key = np.sign(np.round(np.asarray(grid.affine)[:3, :3], 6)).tobytes() + bytes(str(tuple(grid.data.shape)), "ascii")
        if key not in mean_cache:
            mean_cache[key] = mean_training_ct(pipe.cfg, grid.affine)
        mean_ct = mean_cache[key]
    scales = [x.strip() for x in args.scales.split(",") if x.strip()]
    if not scales or set(scales) - {"frontal", "prior"}:
        raise FromModelError(f"--scales must list frontal and/or prior, got {args.scales!r}")
    scales = [scale] + [x for x in scales if x != scale]          # the written scale first (the figure's)
    out = evaluate_ct(pipe, grid, methods=methods, yaws=pipe.yaws(args.yaw_step), iterations=args.iterations,
                      mean_ct=mean_ct, scales=tuple(scales), log=lambda m: print(m, file=sys.stderr))
    m, a = out["metrics"], out["arrays"]
    os.makedirs(args.out, exist_ok=True)
    rec = a["recs"][(scale, methods[0])]
    save_volume(Volume(mu_to_hu(rec).contiguous(), grid.affine), os.path.join(args.out, "recon.nii.gz"))
    save_figure(os.path.join(args.out, "from_model.png"), a, f"X-WIN → CT: {label} ({methods[0]}, scale {scale})",
                methods[0], scale, m)
    doc = {"input": label, "checkpoint": pipe.ckpt, "decoder": pipe.decoder_path, "world_step": pipe.step,
           "yaws_deg": a["yaws"].tolist(), "methods": methods, "written": {"method": methods[0], "scale": scale},
           "grid": {"shape": list(grid.data.shape), "affine": np.asarray(grid.affine).tolist()}, **m}
    write_json(os.path.join(args.out, "metrics.json"), doc)
    return doc


def run_image(pipe: Pipeline, args) -> dict:
    import torch

    from xwin.decoder import context_image
    from xwin.intensity import mu_to_hu
    from xwin.io import Volume, load_radiograph, save_volume
    from xwin.reconstruct.report import write_json

    if args.scale == "frontal":
        raise FromModelError("--scale frontal needs line integrals of the frontal view: use --ct (a radiograph "
                             "gives none; the training prior is used)")
    try:
        img = load_radiograph(args.image)
    except Exception as e:
        raise FromModelError(f"cannot read radiograph {args.image!r}: {e}") from None
    methods = _methods(args.methods)
    yaws = pipe.yaws(args.yaw_step)
    ctx = context_image(torch.as_tensor(img, dtype=torch.float32), pipe.cfg)
    dec = pipe.predict(ctx, yaws) * float(pipe.meta["prior_scale"])
    d = pipe.cfg.get("data", {})
    shape = tuple(int(x) for x in d.get("ct_shape", [64, 64, 64]))
    sp = np.broadcast_to(np.asarray(d.get("ct_spacing", [5.0, 5.0, 5.0]), dtype=np.float64), (3,))
    affine = np.diag(list(sp) + [1.0])
    affine[:3, 3] = -sp * (np.asarray(shape) - 1) / 2                 # grid centred on the world origin
    from xwin.decoder import view_geometry

    geom = view_geometry(yaws, pipe.cfg, (0.0, 0.0, 0.0), size=pipe.img_size)
    prior = mean_training_ct(pipe.cfg, affine) if any(m.endswith("-prior") for m in methods) else None
    recs = {("prior", m): reconstruct(m, dec, geom, shape, affine, pipe.cfg, yaws, (0.0, 0.0, 0.0), args.iterations,
                                      prior) for m in methods}
    os.makedirs(args.out, exist_ok=True)
    save_volume(Volume(mu_to_hu(recs[("prior", methods[0])]).contiguous(), affine), os.path.join(args.out, "recon.nii.gz"))
    save_figure(os.path.join(args.out, "from_model.png"),
                {"context": ctx[0, 0], "decoded": dec, "yaws": yaws, "affine": affine, "recs": recs},
                f"X-WIN → CT from {os.path.basename(args.image)} ({methods[0]}, prior scale; no ground truth)",
                methods[0], "prior")
    doc = {"input": args.image, "checkpoint": pipe.ckpt, "decoder": pipe.decoder_path, "yaws_deg": yaws.tolist(),
           "methods": methods, "scale": {"prior_s": float(pipe.meta["prior_scale"])},
           "grid": {"shape": list(shape), "affine": affine.tolist()},
           "note": "no ground truth for a radiograph: no 3D metrics; the grid is the world model's, centred on the "
                   "world origin"}
    write_json(os.path.join(args.out, "metrics.json"), doc)
    return doc


def run_heldout(pipe: Pipeline, args) -> dict:
    """``--heldout N``: mean and per-CT metrics over N phantoms no training ever saw."""
    from xwin.data import chest_phantom
    from xwin.reconstruct.report import write_json

    if args.heldout < 1:
        raise FromModelError("--heldout needs at least 1 CT")
    d = pipe.cfg.get("data", {})
    per, first = [], None
    os.makedirs(args.out, exist_ok=True)
    mean_cache: Dict[bytes, object] = {}
    for i in range(args.heldout):
        seed = HELDOUT_SEED0 + i
        vol = chest_phantom(d.get("ct_shape", [64, 64, 64]), d.get("ct_spacing", [5.0, 5.0, 5.0]), seed=seed)
        print(f"held-out phantom {seed} ({i + 1}/{args.heldout})", file=sys.stderr)
        sub = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, f"ct_{seed}")})
        doc = run_ct(pipe, vol, sub, f"held-out phantom seed {seed}", mean_cache)
        per.append(doc)
        first = first or doc
    table = summarise(per)
    out = {"checkpoint": pipe.ckpt, "decoder": pipe.decoder_path, "world_step": pipe.step, "cts": args.heldout,
           "seeds": [HELDOUT_SEED0 + i for i in range(args.heldout)], "yaws_deg": first["yaws_deg"],
           "summary": table, "per_ct": [{k: v for k, v in d.items() if k in ("input", "views_2d", "volume_3d", "scale")}
                                        for d in per]}
    write_json(os.path.join(args.out, "heldout.json"), out)
    Path(args.out, "heldout.md").write_text(markdown_table(table) + "\n")
    return out


def summarise(per: Sequence[dict]) -> dict:
    """Mean ± std over CTs of every 2D and 3D row."""
    def agg(vals):
        v = np.asarray(vals, dtype=np.float64)
        return [round(float(v.mean()), 3), round(float(v.std()), 3)]

    out = {"views_2d": {}, "volume_3d": {}}
    for k in per[0]["views_2d"]:
        out["views_2d"][k] = {q: agg([d["views_2d"][k][q] for d in per]) for q in ("psnr_db", "ssim")}
    for k in per[0]["volume_3d"]:
        out["volume_3d"][k] = {q: agg([d["volume_3d"][k][q] for d in per]) for q in ("psnr_db", "ssim")}
    return out


def markdown_table(t: dict) -> str:
    lines = ["| rows (mean ± std over CTs) | PSNR dB | SSIM |", "|---|---|---|"]
    for k, v in t["views_2d"].items():
        lines.append(f"| 2D decoded vs true views, scale {k} | {v['psnr_db'][0]:.2f} ± {v['psnr_db'][1]:.2f} | "
                     f"{v['ssim'][0]:.3f} ± {v['ssim'][1]:.3f} |")
    for k, v in t["volume_3d"].items():
        lines.append(f"| 3D {k} | {v['psnr_db'][0]:.2f} ± {v['psnr_db'][1]:.2f} | {v['ssim'][0]:.3f} ± {v['ssim'][1]:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    from xwin.errors import XwinError

    torch.set_num_threads(args.threads or (1 if "OMP_NUM_THREADS" not in os.environ else torch.get_num_threads()))
    try:
        if args.iterations < 1:
            raise FromModelError("--iterations must be at least 1")
        if args.yaw_step is not None and not (args.yaw_step > 0 and math.isfinite(args.yaw_step)):
            raise FromModelError("--yaw-step must be a positive number of degrees")
        _methods(args.methods)
        pipe = Pipeline(args.ckpt, args.decoder, args.device)
        if args.ct:
            doc = run_ct(pipe, _load_ct(args.ct), args, args.ct)
            print(json.dumps({"views_2d": {k: {q: v[q] for q in ("psnr_db", "ssim")} for k, v in doc["views_2d"].items()},
                              "volume_3d": {k: {q: v[q] for q in ("psnr_db", "ssim")} for k, v in doc["volume_3d"].items()}},
                             indent=1))
        elif args.image:
            run_image(pipe, args)
        else:
            print(markdown_table(run_heldout(pipe, args)["summary"]))
    except (FromModelError, XwinError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"outputs in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
