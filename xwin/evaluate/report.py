"""Writing results: metrics.json, predictions.csv, figures (ROC per finding, AUROC / R² bar charts)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np

__all__ = ["write_json", "write_predictions", "plot_linear", "plot_fewshot", "plot_anatomy"]

_COLORS = {"xwin": "#1f77b4", "random": "#ff7f0e", "pixels": "#2ca02c"}


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_json(obj, path: Path) -> None:
    Path(path).write_text(json.dumps(_clean(obj), indent=2) + "\n")


def write_predictions(rows: List[Dict], path: Path) -> None:
    cols = ["id", "path", "patient", "split", "finding", "label", "encoder", "score"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_linear(curves: Dict, metrics: Dict, path: Path, title: str) -> None:
    """ROC curves per finding (one line per encoder) and a bar chart of AUROC with 95 % CIs."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    findings = list(next(iter(curves.values())).keys()) if curves else []
    ncol = max(1, min(len(findings), 4))
    nrow = math.ceil(len(findings) / ncol) + 1
    fig = plt.figure(figsize=(3.3 * max(ncol, 3), 3.2 * nrow))
    gs = fig.add_gridspec(nrow, ncol)
    for k, f in enumerate(findings):
        ax = fig.add_subplot(gs[k // ncol, k % ncol])
        for enc, per in curves.items():
            y, s = per[f]
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            auc = metrics[enc]["findings"][f]["auroc"]
            ax.plot(fpr, tpr, color=_COLORS.get(enc), label=f"{enc} {auc:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(f, fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(gs[nrow - 1, :])
    names = findings + ["macro"]
    encs = list(metrics)
    w = 0.8 / max(1, len(encs))
    for j, enc in enumerate(encs):
        vals, lo, hi = [], [], []
        for f in names:
            m = metrics[enc]["macro"] if f == "macro" else metrics[enc]["findings"][f]
            a, ci = m["auroc"], m["ci95"]
            vals.append(a)
            lo.append(a - ci[0] if np.isfinite(ci[0]) else 0.0)
            hi.append(ci[1] - a if np.isfinite(ci[1]) else 0.0)
        x = np.arange(len(names)) + (j - (len(encs) - 1) / 2) * w
        ax.bar(x, vals, w, yerr=[lo, hi], capsize=2, color=_COLORS.get(enc), label=enc)
    ax.axhline(0.5, ls=":", color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_title("test AUROC (95% CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fewshot(fewshot: Dict, path: Path, title: str) -> None:
    """Macro AUROC against shots per encoder, mean ± sd over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for enc, per in fewshot.items():
        ks = sorted(int(k) for k in per)
        m = [per[str(k)]["macro"]["mean"] for k in ks]
        s = [per[str(k)]["macro"]["sd"] for k in ks]
        ax.errorbar(ks, m, yerr=s, marker="o", capsize=3, color=_COLORS.get(enc), label=enc)
    ax.axhline(0.5, ls=":", color="grey", lw=0.8)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("macro AUROC (test)")
    _save(plt, fig, ax, title, path)


def _save(plt, fig, ax, title: str, path: Path) -> None:
    """Title, legend, layout, write, close: the common end of the one-axis figures."""
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_anatomy(anatomy: Dict, path: Path, title: str) -> None:
    """R² per anatomy target and encoder with 95 % CIs."""
    plt = _plt()
    encs = list(anatomy)
    names = list(next(iter(anatomy.values())).keys()) if encs else []
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.2))
    w = 0.8 / max(1, len(encs))
    for j, enc in enumerate(encs):
        vals = [anatomy[enc][t]["r2"] for t in names]
        lo = [v - anatomy[enc][t]["ci95"][0] if np.isfinite(anatomy[enc][t]["ci95"][0]) else 0 for v, t in zip(vals, names)]
        hi = [anatomy[enc][t]["ci95"][1] - v if np.isfinite(anatomy[enc][t]["ci95"][1]) else 0 for v, t in zip(vals, names)]
        x = np.arange(len(names)) + (j - (len(encs) - 1) / 2) * w
        ax.bar(x, vals, w, yerr=[lo, hi], capsize=2, color=_COLORS.get(enc), label=enc)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test R²")
    _save(plt, fig, ax, title, path)
