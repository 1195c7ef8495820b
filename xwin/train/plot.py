"""The run figure (``curve.png``) from ``metrics.jsonl`` and ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["plot_run"]


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(y) < w:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    s = (c[w:] - c[:-w]) / w
    return np.concatenate([np.full(w - 1, np.nan), s])


def plot_run(run_dir, png) -> None:
    """Top row, training batches: alignment loss, top-1 matching accuracy, MIM and patch losses (raw and
    moving average). Bottom row, when the run validated: CT and yaw retrieval top-1 with their chance
    levels, patch-token MSE and real-vs-simulated feature cosine, held-out CTs (``val``) against
    training CTs (``train_eval``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    summ = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    train = [r for r in rows if "align" in r]
    vals = [r for r in rows if "val/ct_top1" in r]
    steps = np.array([r["step"] for r in train])
    w = max(1, len(train) // 20)
    nrow = 2 if vals else 1
    fig, ax = plt.subplots(nrow, 3, figsize=(13, 3.6 * nrow), squeeze=False)
    for a, keys, title in ((ax[0, 0], ("align",), "alignment loss (InfoNCE + λ·affinity)"),
                           (ax[0, 1], ("top1",), "top-1 latent matching accuracy (train batch)"),
                           (ax[0, 2], ("mim", "patch_mse"), "MIM loss / view-predictor patch MSE")):
        for j, key in enumerate(keys):
            y = np.array([r.get(key, np.nan) for r in train])
            a.plot(steps, y, color="0.75", lw=0.8)
            a.plot(steps, _smooth(y, w), color=f"C{j}", lw=1.8, label=f"{key} (moving average {w})")
        a.set_title(title, fontsize=10)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    if "chance_top1" in summ:
        ax[0, 1].axhline(summ["chance_top1"], color="C3", ls="--", lw=1, label="chance")
    if vals:
        vs = np.array([r["step"] for r in vals])
        panels = ((ax[1, 0], ("ct_top1",), "ct_chance", "CT retrieval top-1"),
                  (ax[1, 1], ("yaw_top1",), "yaw_chance", "yaw retrieval top-1"),
                  (ax[1, 2], ("patch_mse", "real_sim_cos"), None, "patch MSE / real-vs-sim cosine"))
        for a, keys, chance, title in panels:
            for j, key in enumerate(keys):
                for name, ls in (("val", "-"), ("train_eval", ":")):
                    y = [r.get(f"{name}/{key}", np.nan) for r in vals]
                    a.plot(vs, y, ls=ls, marker=".", color=f"C{j}", label=f"{name} {key}")
            if chance:
                a.axhline(vals[-1][f"val/{chance}"], color="C3", ls="--", lw=1, label="chance")
            a.set_title(title + " (validation)", fontsize=10)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    name = summ.get("config", "")
    fig.suptitle(f"X-WIN {name} run: {summ.get('world_size', 1)}×{summ.get('batch_per_rank', '?')} CTs × "
                 f"{summ.get('targets_per_ct', '?')} targets per step, {summ.get('device', '')}"
                 + ("; validation: held-out CTs solid, training CTs dotted" if vals else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
