"""``python -m xwin.evaluate`` / ``xwin-evaluate``: linear probing and few-shot on labelled radiographs, or on
the built-in findings benchmark (synthetic patients from CTs, exact ground truth), plus the 3-D anatomy
probe; X-WIN features against a random-init encoder of the same architecture and a pixel/PCA baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import XwinError
from .features import EncoderSpec, FeatureCache, FileImages, compute_many, file_digest, make_extractor
from .labels import SPLITS, LabelTable, read_labels
from .probes import bootstrap_ci, fast_auroc, fewshot_probe, linear_probe, pca_fit, ridge_probe, summarize_auroc, _r2
from .report import plot_anatomy, plot_fewshot, plot_linear, write_json, write_predictions

__all__ = ["main", "run_evaluation", "resolve_checkpoint", "training_config"]

ENCODERS = ("xwin", "random", "pixels")


# ----------------------------------------------------------------------------------------- inputs
def resolve_checkpoint(path) -> Path:
    """A checkpoint file: the path itself, or a run folder's checkpoint.pt / single *.safetensors."""
    p = Path(path)
    if p.is_dir():
        for cand in [p / "checkpoint.pt", *sorted(p.glob("*.safetensors"))]:
            if cand.is_file():
                return cand
        raise XwinError(f"no checkpoint.pt or *.safetensors in {p}")
    if not p.is_file():
        raise XwinError(f"checkpoint not found: {p}")
    return p


def training_config(checkpoint: Path, config: Optional[str] = None) -> dict:
    """The pretraining config (for the benchmark's render pose, CT grid and image size)."""
    if config:
        from xwin.train import load_config

        return load_config(config)
    side = checkpoint.parent / "config.json"
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise XwinError(f"cannot read the run config {side}: {e}") from None
    if checkpoint.suffix != ".safetensors":
        import torch

        try:
            ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
                return ck["config"]
        except Exception:
            pass
    raise XwinError(f"no training config found for {checkpoint} (no config.json beside it): give --config")


def _which(ckpt: Path, asked: Optional[str]) -> str:
    """The encoder to use: an exported safetensors file holds one (named in its metadata)."""
    if ckpt.suffix != ".safetensors":
        return asked or "target"
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as f:
            held = (f.metadata() or {}).get("xwin_which", "target")
    except Exception as e:
        raise XwinError(f"cannot read {ckpt} as safetensors: {type(e).__name__}: {e}") from None
    if asked is not None and asked != held:
        raise XwinError(f"{ckpt} holds the {held} encoder, not the {asked} one: give the training checkpoint "
                        f"or an export of the {asked} encoder")
    return held


# ----------------------------------------------------------------------------------------- core
def _features(names, checkpoint, digest, images, images_key, cache_dir, args, log) -> Dict[str, np.ndarray]:
    """Features per encoder: from the cache, else computed for all missing encoders in one pass."""
    cache = FeatureCache(cache_dir, digest, images_key)
    feats, todo = {}, {}
    for name in names:
        spec = EncoderSpec(name, which=args.which, layer=args.layer, seed=args.seed, pool=args.pool)
        f = cache.get(spec)
        if f is not None and len(f) == len(images):
            log(f"features {name}: cached ({cache.path(spec).name})")
            feats[name] = f
        else:
            todo[name] = spec
    if todo:
        t0 = time.perf_counter()
        ex = {name: make_extractor(spec, checkpoint, device=args.device)[0] for name, spec in todo.items()}
        new = compute_many(ex, images, batch=args.batch_size, progress=args.progress)
        for name, spec in todo.items():
            cache.put(spec, new[name])
            feats[name] = new[name]
        log(f"features {', '.join(todo)}: {len(images)} images in {time.perf_counter() - t0:.1f} s")
    return {n: feats[n] for n in names}


def _macro_fn(yt: Dict[str, np.ndarray], st: Dict[str, np.ndarray]):
    """Macro AUROC over findings on a resample of test-row indices (NaN if a finding loses a class)."""
    def macro(idx):
        vals = []
        for f in yt:
            y, s = yt[f][idx], st[f][idx]
            ok = np.isfinite(y)
            vals.append(fast_auroc(y[ok], s[ok]))
        return float(np.mean(vals)) if all(np.isfinite(vals)) else float("nan")
    return macro


def _usable(y: np.ndarray, split: np.ndarray, findings: Sequence[str]) -> List[int]:
    """Findings with both classes in train and in test (others dropped with a warning naming the split)."""
    keep = []
    for j, f in enumerate(findings):
        bad = []
        for s in ("train", "test", "val"):
            v = y[(split == s) & np.isfinite(y[:, j]), j]
            if (v == 1).sum() == 0 or (v == 0).sum() == 0:
                bad.append(f"{s} ({int((v == 1).sum())} positive, {int((v == 0).sum())} negative)")
        if bad and not bad[0].startswith("val"):
            warnings.warn(f"finding {f!r} has a single class in split {bad[0]}: left out", stacklevel=2)
            continue
        if bad:
            warnings.warn(f"finding {f!r} has a single class in split {bad[0]}: its C is not tuned", stacklevel=2)
        keep.append(j)
    return keep


def _counts(y, split, findings) -> Dict:
    out = {}
    for j, f in enumerate(findings):
        out[f] = {s: {"positive": int(((split == s) & (y[:, j] == 1)).sum()),
                      "negative": int(((split == s) & (y[:, j] == 0)).sum())} for s in SPLITS}
    return out


def run_evaluation(images, y: np.ndarray, findings: Sequence[str], split: np.ndarray,
                   patients: np.ndarray, ids: Sequence[str], paths: Sequence[str], checkpoint: Path,
                   images_key: str, cache_dir: Path, out_dir: Path, args, targets: Optional[np.ndarray] = None,
                   target_names: Sequence[str] = (), title: str = "", log=print) -> dict:
    """Features, probes, statistics and files (written into ``out_dir``); returns the metrics dict.

    ``images``: (N, S, S) array or :class:`FileImages`; rows whose images do not decode (NaN features) are
    left out with a warning naming the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fail fast here; the warnings come after the undecodable rows are gone
        if not _usable(y, split, findings) and targets is None:
            raise XwinError("no finding has both classes in the train and test splits: nothing to evaluate")
    digest = file_digest(checkpoint)
    feats = _features(args.encoders, checkpoint, digest, images, images_key, cache_dir, args, log)
    ok = np.all([np.isfinite(f).all(axis=1) for f in feats.values()], axis=0)
    skipped = []
    if not ok.all():
        failed = getattr(images, "failed", {})
        for i in np.nonzero(~ok)[0]:
            why = failed.get(int(i), "did not decode in an earlier run (features cached as NaN)")
            warnings.warn(f"cannot decode {paths[i]} ({why}); left out", stacklevel=2)
            skipped.append(str(paths[i]))
        if not ok.any():
            raise XwinError("none of the images decoded")
        feats = {k: f[ok] for k, f in feats.items()}
        y, split, patients = y[ok], split[ok], np.asarray(patients)[ok]
        ids, paths = [ids[i] for i in np.nonzero(ok)[0]], [paths[i] for i in np.nonzero(ok)[0]]
        targets = targets[ok] if targets is not None else None
    keep = _usable(y, split, findings)
    if not keep and targets is None:
        raise XwinError("no finding has both classes in the train and test splits: nothing to evaluate")
    width = next((f.shape[1] for n, f in feats.items() if n != "pixels"), None)
    if "pixels" in feats:
        if width is None:  # pixels alone: the encoder's width all the same
            from ..model import load_encoder

            width = int(load_encoder(checkpoint, which=args.which).embed_dim)
        feats["pixels"] = pca_fit(feats["pixels"], split, width)
    patients = np.asarray(patients)
    test = split == "test"
    metrics: Dict = {"counts": _counts(y, split, findings), "images": {s: int((split == s).sum()) for s in SPLITS},
                     "skipped_images": skipped,
                     "patients": {s: len(set(patients[split == s].tolist())) for s in SPLITS}}
    rows: List[Dict] = []
    t0 = time.perf_counter()
    if "linear" in args.mode and keep:
        lin, curves, macros = {}, {}, {}
        for enc, x in feats.items():
            per, scores = {}, {}
            for j in keep:
                f = findings[j]
                r = linear_probe(x, y[:, j], split, standardize=enc != "pixels")
                s = summarize_auroc(y[test, j], r["scores"][test], patients[test], args.bootstrap, args.seed)
                per[f] = {**s, "C": r["C"], "val_auroc": r["val_auroc"]}
                scores[f] = r["scores"]
                for i in np.nonzero(test & np.isfinite(y[:, j]))[0]:
                    rows.append({"id": ids[i], "path": paths[i], "patient": patients[i], "split": "test",
                                 "finding": f, "label": int(y[i, j]), "encoder": enc, "score": f"{scores[f][i]:.6g}"})
            yt = {f: y[test, j] for j, f in zip(keep, [findings[j] for j in keep])}
            st = {f: scores[f][test] for f in yt}

            macro = _macro_fn(yt, st)
            macros[enc] = macro
            m = float(np.mean([per[f]["auroc"] for f in per]))
            lin[enc] = {"findings": per, "macro": {"auroc": m, "ci95": bootstrap_ci(macro, patients[test], args.bootstrap,
                                                                                     args.seed)}}
            curves[enc] = {f: (yt[f][np.isfinite(yt[f])], st[f][np.isfinite(yt[f])]) for f in yt}
        metrics["linear"] = lin
        if "random" in macros:  # paired: the same patient resamples for both encoders
            for enc in [e for e in macros if e != "random"]:
                d = (lambda i, a=macros[enc], b=macros["random"]: a(i) - b(i))
                lin[enc]["macro_minus_random"] = {"delta": lin[enc]["macro"]["auroc"] - lin["random"]["macro"]["auroc"],
                                                  "ci95": bootstrap_ci(d, patients[test], args.bootstrap, args.seed)}
        metrics["linear_seconds"] = time.perf_counter() - t0
        if args.plot:
            plot_linear(curves, lin, out_dir / "roc_auroc.png", title or "linear probe")
    if "fewshot" in args.mode and keep:
        t1 = time.perf_counter()
        few: Dict = {}
        for enc, x in feats.items():
            few[enc] = {}
            for k in args.shots:
                per = {findings[j]: fewshot_probe(x, y[:, j], split, k, args.seeds, standardize=enc != "pixels")
                       for j in keep}
                per = {f: v for f, v in per.items() if v is not None}
                if not per:
                    warnings.warn(f"{k}-shot: no finding has {k} positives and {k} negatives in train", stacklevel=2)
                    continue
                means = np.array([v["per_seed"] for v in per.values()]).mean(0)  # macro per seed
                few[enc][str(k)] = {"findings": per, "macro": {"mean": float(means.mean()),
                                                               "sd": float(means.std(ddof=1)) if len(means) > 1 else 0.0}}
        metrics["fewshot"] = few
        metrics["fewshot_seconds"] = time.perf_counter() - t1
        if args.plot and any(few.values()):
            plot_fewshot({e: v for e, v in few.items() if v}, out_dir / "fewshot.png", title or "few-shot")
    if targets is not None and len(target_names):
        t2 = time.perf_counter()
        ana: Dict = {}
        for enc, x in feats.items():
            ana[enc] = {}
            for k, name in enumerate(target_names):
                r = ridge_probe(x, targets[:, k], split, standardize=enc != "pixels")
                tt, pp = targets[test, k], r["pred"][test]
                ana[enc][name] = {"r2": _r2(tt, pp), "ci95": bootstrap_ci(lambda i, tt=tt, pp=pp: _r2(tt[i], pp[i]),
                                                                          patients[test], args.bootstrap, args.seed),
                                  "alpha": r["alpha"], "val_r2": r["val_r2"]}
        metrics["anatomy"] = ana
        metrics["anatomy_seconds"] = time.perf_counter() - t2
        if args.plot:
            plot_anatomy(ana, out_dir / "anatomy_r2.png", title or "3-D anatomy probe")
    write_predictions(rows, out_dir / "predictions.csv")
    return metrics


# ----------------------------------------------------------------------------------------- output folder
class _Staging:
    """Results are written into a hidden folder inside DIR and moved into DIR only when complete; on any
    failure the staging folder is removed (and DIR too if this run created it and it holds nothing)."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.created = not self.out.exists()
        if self.out.exists() and not self.out.is_dir():
            raise XwinError(f"--out {self.out} exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.out))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for f in sorted(self.tmp.iterdir()):
                os.replace(f, self.out / f.name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is not None and self.created and self.out.exists() and not any(self.out.iterdir()):
            self.out.rmdir()
        return False


def _labels_mode(args, ckpt: Path, log) -> None:
    table: LabelTable = read_labels(args.labels, args.images, path_col=args.path_col, patient_col=args.patient_col,
                                    findings=args.findings, label_col=args.label_col, uncertain=args.uncertain,
                                    split_col=args.split_col, seed=args.seed, fractions=args.split_fractions,
                                    missing=args.missing)
    log(f"{len(table.paths)} images, {len(set(table.patients))} patients, dialect {table.dialect}, "
        f"findings: {', '.join(table.findings)}")
    from ..model import load_encoder

    size = int(load_encoder(ckpt, which=args.which).img_size)
    images = FileImages(table.files, size)
    stat = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in table.files]
    images_key = hashlib.sha256(json.dumps([size, stat]).encode()).hexdigest()
    cfg = {k: v for k, v in vars(args).items() if k not in ("func",)}
    with _Staging(Path(args.out)) as tmp:
        t0 = time.perf_counter()
        m = run_evaluation(images, table.y, table.findings, table.split, np.asarray(table.patients), table.paths,
                           table.paths, ckpt, images_key, Path(args.out) / "cache", tmp, args, title=Path(args.labels).name,
                           log=log)
        m.update({"config": cfg, "checkpoint": str(ckpt), "dialect": table.dialect, "findings": table.findings,
                  "notes": table.notes, "seconds": time.perf_counter() - t0})
        write_json(m, tmp / "metrics.json")
    _print_table(m, log)


def _benchmark_mode(args, ckpt: Path, log) -> None:
    from ..findings import BenchmarkConfig, build_benchmark, summary

    if args.benchmark != "findings":
        raise XwinError(f"unknown benchmark {args.benchmark!r} (findings)")
    tc = training_config(ckpt, args.config)
    data, model = tc.get("data", {}), tc.get("model", {})
    bc = BenchmarkConfig(patients=args.patients, images_per_patient=args.images_per_patient, seed=args.seed,
                         prevalence=args.prevalence, ct_shape=tuple(data.get("ct_shape", (64, 64, 64))),
                         ct_spacing=tuple(np.broadcast_to(np.asarray(data.get("ct_spacing", 5.0), float), (3,)).tolist()),
                         render={k: v for k, v in tc.get("render", {}).items()}, img_size=model.get("img_size"),
                         density=data.get("density", "mu"))
    bc.validate()
    out = Path(args.out)
    cache_dir = out / "cache"
    key = hashlib.sha256(json.dumps({"bench": bc.key(), "v": 1}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    bpath = cache_dir / f"benchmark-{key}.npz"
    with _Staging(out) as tmp:
        t0 = time.perf_counter()
        if bpath.exists():
            with np.load(bpath) as z:
                bench = {k: z[k] for k in z.files}
            bench["findings"], bench["target_names"] = list(bench["findings"]), list(bench["target_names"])
            log(f"benchmark images: cached ({bpath.name})")
        else:
            bar = None
            if args.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=bc.patients * bc.images_per_patient, desc="rendering", leave=False)
            bench = build_benchmark(bc, progress=(lambda d, t: bar.update(d - bar.n)) if bar else None)
            if bar:
                bar.close()
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tpath = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=cache_dir)
            os.close(fd)
            np.savez(tpath, **{k: np.asarray(v) for k, v in bench.items()})
            os.replace(tpath, bpath)
        render_s = time.perf_counter() - t0
        for line in summary(bench):
            log(line)
        from .labels import patient_split

        split = patient_split(bench["patients"].tolist(), seed=args.seed, fractions=args.split_fractions)
        ids = bench["ids"].tolist()
        m = run_evaluation(bench["images"], bench["labels"].astype(np.float64), bench["findings"], split,
                           bench["patients"], ids, ids, ckpt, key, cache_dir, tmp, args, targets=bench["targets"],
                           target_names=bench["target_names"], title="findings benchmark", log=log)
        m.update({"config": {k: v for k, v in vars(args).items()}, "benchmark": bc.key(), "checkpoint": str(ckpt),
                  "findings": bench["findings"], "render_seconds": render_s, "seconds": time.perf_counter() - t0,
                  "anatomy_target_ranges": {t: [float(bench["targets"][:, k].min()), float(bench["targets"][:, k].max())]
                                            for k, t in enumerate(bench["target_names"])}})
        m["anatomy_family_only_r2"] = _family_only_r2(bench, split)
        write_json(m, tmp / "metrics.json")
    _print_table(m, log)


def _family_only_r2(bench: dict, split: np.ndarray) -> Dict[str, float]:
    """Reference for the anatomy probe: test R² of predicting each target by the mean of its patient family
    (deformed sample CT or phantom) on train + val, i.e. what knowing only the family explains."""
    fam = np.asarray([str(p).split("-")[0] for p in bench["patients"]])
    fit, te = split != "test", split == "test"
    out = {}
    for k, name in enumerate(bench["target_names"]):
        t = bench["targets"][:, k]
        pred = np.asarray([t[fit & (fam == f)].mean() if (fit & (fam == f)).any() else t[fit].mean() for f in fam])
        out[name] = _r2(t[te], pred[te])
    return out


def _print_table(m: dict, log) -> None:
    for enc, v in m.get("linear", {}).items():
        cells = [f"{f} {d['auroc']:.3f}" for f, d in v["findings"].items()]
        ci = v["macro"]["ci95"]
        gain = v.get("macro_minus_random")
        g = f" (vs random {gain['delta']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}])" if gain else ""
        log(f"linear {enc:7s} macro AUROC {v['macro']['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{g}  " + "  ".join(cells))
    for enc, v in m.get("fewshot", {}).items():
        log(f"fewshot {enc:7s} " + "  ".join(f"{k}-shot {d['macro']['mean']:.3f}±{d['macro']['sd']:.3f}" for k, d in v.items()))
    for enc, v in m.get("anatomy", {}).items():
        log(f"anatomy {enc:7s} R² " + "  ".join(f"{t} {d['r2']:.3f}" for t, d in v.items()))
    if "anatomy_family_only_r2" in m:
        log("anatomy family-only R² " + "  ".join(f"{t} {r:.3f}" for t, r in m["anatomy_family_only_r2"].items()))


# ----------------------------------------------------------------------------------------- CLI
def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt), exported encoder (.safetensors) "
                   "or run folder")
    p.add_argument("--labels", help="label CSV (CheXpert-style columns, NIH 'Finding Labels', or path,label)")
    p.add_argument("--images", help="folder the CSV's paths are relative to")
    p.add_argument("--benchmark", choices=["findings"], help="built-in synthetic findings benchmark (no data needed)")
    p.add_argument("--out", help="output folder (default runs/evaluate-<labels stem | benchmark>)")
    p.add_argument("--mode", nargs="+", choices=["linear", "fewshot"], default=["linear"])
    p.add_argument("--shots", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--seeds", type=int, default=5, help="few-shot draws per k")
    p.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    p.add_argument("--which", choices=["target", "context"], help="EMA target (default) or context encoder of a "
                   "training checkpoint; an exported .safetensors holds one of them")
    p.add_argument("--layer", type=int, default=-1, help="block whose mean-pooled tokens are the features "
                   "(-1: the last, after the final norm)")
    p.add_argument("--pool", choices=["mean", "grid"], default="mean", help="mean of all patch tokens (D features), "
                   "or means of the four quadrants of the token grid (4D, keeps coarse position)")
    g = p.add_argument_group("label files")
    g.add_argument("--path-col")
    g.add_argument("--patient-col")
    g.add_argument("--label-col")
    g.add_argument("--findings", nargs="+")
    g.add_argument("--split-col")
    g.add_argument("--uncertain", choices=["ignore", "ones", "zeros"], default="ignore")
    g.add_argument("--missing", choices=["error", "skip"], default="error", help="images listed but not found")
    g.add_argument("--split-fractions", nargs=3, type=float, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    b = p.add_argument_group("findings benchmark")
    b.add_argument("--patients", type=int, default=150)
    b.add_argument("--images-per-patient", type=int, default=2)
    b.add_argument("--prevalence", type=float, default=0.4)
    b.add_argument("--config", help="training config (name or JSON) if no config.json sits beside the checkpoint")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (by patient) for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "xwin-evaluate" if Path(sys.argv[0]).name == "xwin-evaluate" else "python -m xwin.evaluate"
    args = _parser(prog).parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    old = warnings.showwarning
    warnings.showwarning = one_line_warning
    t0 = time.perf_counter()
    try:
        if bool(args.labels) == bool(args.benchmark):
            raise XwinError("give either --labels CSV --images ROOT, or --benchmark findings")
        if args.labels and not args.images:
            raise XwinError("--labels needs --images ROOT (the folder the CSV's paths are relative to)")
        if min(args.shots) < 1 or args.seeds < 1 or args.bootstrap < 0:
            raise XwinError("--shots and --seeds must be >= 1, --bootstrap >= 0")
        if args.out is None:
            args.out = f"runs/evaluate-{Path(args.labels).stem if args.labels else args.benchmark}"
        ckpt = resolve_checkpoint(args.checkpoint)
        args.which = _which(ckpt, args.which)
        (_labels_mode if args.labels else _benchmark_mode)(args, ckpt, log)
    except XwinError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = old
    log(f"wrote {args.out}/metrics.json, predictions.csv and figures in {time.perf_counter() - t0:.1f} s")
    return 0
