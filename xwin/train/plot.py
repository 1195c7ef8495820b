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
    """Alignment loss and top-1 matching accuracy (raw and moving average) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    summ = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    steps = np.array([r["step"] for r in rows])
    w = max(1, len(rows) // 20)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for a, key, title in ((ax[0], "align", "alignment loss (InfoNCE + λ·affinity)"),
                          (ax[1], "top1", "top-1 latent matching accuracy"),
                          (ax[2], "mim", "MIM loss (sim + real)")):
        y = np.array([r[key] for r in rows])
        a.plot(steps, y, color="0.75", lw=0.8, label="per step")
        a.plot(steps, _smooth(y, w), color="C0", lw=1.8, label=f"moving average ({w})")
        a.set_title(title, fontsize=10)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    if "chance_top1" in summ:
        ax[1].axhline(summ["chance_top1"], color="C3", ls="--", lw=1, label="chance")
    ax[1].legend(fontsize=8)
    name = summ.get("config", "")
    fig.suptitle(f"X-WIN {name} run: {summ.get('world_size', 1)}×{summ.get('batch_per_rank', '?')} CTs × "
                 f"{summ.get('targets_per_ct', '?')} targets per step, {summ.get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
