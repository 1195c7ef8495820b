"""Probes on frozen features (scikit-learn) and their statistics.

* :func:`linear_probe`: per finding, L2 logistic regression on standardised features; the strength C is
  the one with the best validation AUROC on a log grid; the model is then refitted on train + val with
  that C and scored on test.
* :func:`fewshot_probe`: k positives + k negatives drawn from the training split per seed (class
  balanced), logistic regression with a fixed C (no validation labels in a k-shot setting), AUROC on test;
  mean and sd over seeds.
* :func:`ridge_probe`: ridge regression of continuous targets, alpha chosen on val by R², refitted on
  train + val, R² on test.
* :func:`bootstrap_ci`: percentile 95 % intervals from resampling *patients* of the test split with
  replacement (images of one patient are not independent).
* :func:`pca_fit`: the ``pixels`` baseline's PCA, fitted on the training split only.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["auroc", "bootstrap_ci", "linear_probe", "fewshot_probe", "ridge_probe", "pca_fit", "C_GRID",
           "ALPHA_GRID", "FEWSHOT_C", "fast_auroc"]

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
ALPHA_GRID = tuple(float(a) for a in np.logspace(-2, 5, 8))
FEWSHOT_C = 0.1


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); NaN if ``y`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def fast_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """The same AUROC as :func:`auroc` (Mann-Whitney U with mid-ranks for ties), vectorised for bootstraps."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(y, p)) if len(y) > 1 else float("nan")


def bootstrap_ci(metric: Callable[[np.ndarray], float], groups: Sequence, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> List[float]:
    """[low, high] percentile interval of ``metric(indices)`` over ``n`` resamples of the groups.

    ``metric`` receives the (repeated) row indices of one resample; resamples on which it is NaN (e.g. a
    single class) are dropped; ``[nan, nan]`` if fewer than 20 % survive.
    """
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.nonzero(inv == g)[0] for g in range(len(uniq))]
    rng = np.random.default_rng([int(seed), 0xB007])
    vals = []
    for _ in range(int(n)):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        v = metric(idx)
        if np.isfinite(v):
            vals.append(v)
    if len(vals) < 0.2 * n:
        return [float("nan"), float("nan")]
    a = (1.0 - level) / 2.0 * 100.0
    return [float(np.percentile(vals, a)), float(np.percentile(vals, 100.0 - a))]


def _scaler(x: np.ndarray, standardize: bool = True):
    """Per-feature standardisation (fitted on the given rows), or the identity for features that already
    carry a meaningful common scale (the pixels baseline's PCA scores)."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler(with_mean=standardize, with_std=standardize).fit(x)


def _logreg(C: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000)


def _fit_quiet(model, x, y):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def linear_probe(x: np.ndarray, y: np.ndarray, split: np.ndarray, grid: Sequence[float] = C_GRID,
                 standardize: bool = True) -> dict:
    """One finding: ``x`` (N, D) features, ``y`` (N,) 0/1/NaN, ``split`` (N,) train/val/test.

    Returns ``{"scores": (N,) test-split scores (NaN elsewhere), "C", "val_auroc", "val_curve"}``.
    """
    ok = np.isfinite(y)
    tr, va, te = [(split == s) & ok for s in ("train", "val", "test")]
    curve = {}
    for C in grid:
        sc = _scaler(x[tr], standardize)
        m = _fit_quiet(_logreg(C), sc.transform(x[tr]), y[tr].astype(int))
        curve[C] = auroc(y[va], m.decision_function(sc.transform(x[va])))
    finite = {c: v for c, v in curve.items() if np.isfinite(v)}
    best = max(finite, key=lambda c: (finite[c], -abs(np.log10(c)))) if finite else 1.0
    fit = tr | va
    sc = _scaler(x[fit], standardize)
    m = _fit_quiet(_logreg(best), sc.transform(x[fit]), y[fit].astype(int))
    scores = np.full(len(y), np.nan)
    scores[te] = m.decision_function(sc.transform(x[te]))
    return {"scores": scores, "C": float(best), "val_auroc": finite.get(best, float("nan")),
            "val_curve": {f"{c:g}": v for c, v in curve.items()}}


def fewshot_probe(x: np.ndarray, y: np.ndarray, split: np.ndarray, shots: int, seeds: int,
                  C: float = FEWSHOT_C, standardize: bool = True) -> Optional[dict]:
    """k-shot AUROC on test over ``seeds`` class-balanced draws; None if train has < k of a class."""
    ok = np.isfinite(y)
    tr = np.nonzero((split == "train") & ok)[0]
    te = (split == "test") & ok
    pos, neg = tr[y[tr] == 1], tr[y[tr] == 0]
    if len(pos) < shots or len(neg) < shots:
        return None
    sc = _scaler(x[split == "train"], standardize)  # unlabelled statistics of the training images
    vals = []
    for s in range(int(seeds)):
        rng = np.random.default_rng([int(s), int(shots), 0xF5])
        pick = np.concatenate([rng.choice(pos, shots, replace=False), rng.choice(neg, shots, replace=False)])
        m = _fit_quiet(_logreg(C), sc.transform(x[pick]), y[pick].astype(int))
        vals.append(auroc(y[te], m.decision_function(sc.transform(x[te]))))
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "per_seed": [float(v) for v in vals]}


def ridge_probe(x: np.ndarray, t: np.ndarray, split: np.ndarray, grid: Sequence[float] = ALPHA_GRID,
                standardize: bool = True) -> dict:
    """One continuous target ``t`` (N,): test-split predictions, chosen alpha, validation R²."""
    from sklearn.linear_model import Ridge

    tr, va, te = [(split == s) for s in ("train", "val", "test")]
    curve = {}
    for a in grid:
        sc = _scaler(x[tr], standardize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's ill-conditioning note at tiny alphas
            m = Ridge(alpha=a).fit(sc.transform(x[tr]), t[tr])
        curve[a] = _r2(t[va], m.predict(sc.transform(x[va])))
    best = max(curve, key=lambda a: curve[a] if np.isfinite(curve[a]) else -np.inf)
    fit = tr | va
    sc = _scaler(x[fit], standardize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Ridge(alpha=best).fit(sc.transform(x[fit]), t[fit])
    pred = np.full(len(t), np.nan)
    pred[te] = m.predict(sc.transform(x[te]))
    return {"pred": pred, "alpha": float(best), "val_r2": curve[best]}


def pca_fit(x: np.ndarray, split: np.ndarray, width: int) -> np.ndarray:
    """The pixels baseline: PCA to ``width`` components (at most n_train - 1), fitted on train only.

    The scores keep their relative variances (one common scale factor, no per-component whitening: the
    last components of a PCA fitted on n samples have almost no training variance, and standardising
    them would blow up their noise on the other splits); probe them with ``standardize=False``.
    """
    from sklearn.decomposition import PCA

    tr = split == "train"
    k = int(max(1, min(width, tr.sum() - 1, x.shape[1])))
    pca = PCA(n_components=k, random_state=0).fit(x[tr])
    z = pca.transform(x)
    return (z / np.sqrt(max(float(np.mean(pca.explained_variance_)), 1e-12))).astype(np.float32)


def summarize_auroc(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int, seed: int = 0) -> Dict:
    """AUROC and its patient-bootstrap CI for one finding on the rows where both are finite."""
    ok = np.isfinite(y) & np.isfinite(scores)
    yy, ss, gg = y[ok], scores[ok], groups[ok]
    return {"auroc": auroc(yy, ss), "ci95": bootstrap_ci(lambda i: fast_auroc(yy[i], ss[i]), gg, n_boot, seed)}
