"""Metrics (PSNR / SSIM / RMSE over the field of view) and the summary figure of a reconstruction."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from xwin.intensity import MU_WATER

from .filters import ReconstructionError

__all__ = ["image_metrics", "peak_memory", "save_figure", "write_json", "display_axes"]


def image_metrics(recon: torch.Tensor, truth: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                  mu_water: float = MU_WATER) -> Dict[str, object]:
    """PSNR and SSIM (scikit-image) and RMSE over the voxels in ``mask`` (default: all), on μ volumes.

    Data range = max − min of the *truth* inside the mask (stated in the result, in 1/mm and in HU).
    SSIM is computed on the whole volume (uniform 7³ window, scikit-image defaults) and its map averaged over
    the mask minus the 3-voxel border that scikit-image itself leaves out of its mean (with an all-true mask
    this is exactly ``structural_similarity``'s value). RMSE is converted to HU with ``mu_water``.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    r = recon.detach().double().cpu().numpy()
    t = truth.detach().double().cpu().numpy()
    if r.shape != t.shape:
        raise ReconstructionError(f"recon {r.shape} and truth {t.shape} differ in shape")
    m = np.ones(t.shape, dtype=bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
    if not m.any():
        raise ReconstructionError("the field-of-view mask is empty: no voxel is seen in every view")
    tv, rv = t[m], r[m]
    lo, hi = float(tv.min()), float(tv.max())
    data_range = hi - lo if hi > lo else 1.0
    psnr = float(peak_signal_noise_ratio(tv, rv, data_range=data_range))
    win = min(7, *[s if s % 2 else s - 1 for s in t.shape])
    ssim = None
    if win >= 3:
        pad = (win - 1) // 2
        core = np.zeros_like(m)
        core[pad:t.shape[0] - pad, pad:t.shape[1] - pad, pad:t.shape[2] - pad] = True
        sel = m & core if (m & core).any() else m
        total, count = 0.0, 0
        for z0, z1, smap in _ssim_slabs(t, r, data_range, win, structural_similarity):
            part = sel[:, :, z0:z1]
            total += float(smap[part].sum())
            count += int(part.sum())
        ssim = total / count
    rmse = float(np.sqrt(np.mean((rv - tv) ** 2)))
    hu = 1000.0 / mu_water
    return {
        "psnr_db": round(psnr, 3),
        "ssim": None if ssim is None else round(ssim, 4),
        "rmse_mu_per_mm": rmse,
        "rmse_hu": round(rmse * hu, 2),
        "mae_hu": round(float(np.mean(np.abs(rv - tv))) * hu, 2),
        "data_range": {"mu_per_mm": [lo, hi], "hu": [round(lo * hu - 1000, 1), round(hi * hu - 1000, 1)],
                       "value_mu_per_mm": data_range,
                       "note": "PSNR/SSIM on μ (1/mm) with data_range = truth max - min over the FOV"},
        "fov_voxels": int(m.sum()),
        "ssim_window": win if ssim is not None else None,
    }


def _ssim_slabs(t: np.ndarray, r: np.ndarray, data_range: float, win: int, structural_similarity,
                max_voxels: int = 1 << 23):
    """scikit-image's SSIM map, a slab of z at a time with a halo of (win − 1)/2 slices, so that a large volume
    (512 × 512 × 133: ~15 float64 temporaries of 280 MB each at once) stays in bounded memory. The map is
    local (win³ uniform filters), so every slab's interior equals the whole-volume map; a volume of at most
    ``max_voxels`` is one slab. Yields ``(z0, z1, map of slices z0..z1)``."""
    nz = t.shape[2]
    per = max(1, max_voxels // max(1, t.shape[0] * t.shape[1]))
    if per >= nz:
        yield 0, nz, structural_similarity(t, r, data_range=data_range, win_size=win, full=True)[1]
        return
    halo = (win - 1) // 2
    for z0 in range(0, nz, per):
        z1 = min(nz, z0 + per)
        a, b = max(0, z0 - halo), min(nz, z1 + halo)
        if b - a < win:                                   # a thin slab: widen it to the window
            a = max(0, b - win)
            b = min(nz, a + win)
        smap = structural_similarity(t[:, :, a:b], r[:, :, a:b], data_range=data_range, win_size=win, full=True)[1]
        yield z0, z1, smap[:, :, z0 - a:z1 - a]


def peak_memory() -> Dict[str, float]:
    """Peak resident memory of this process (MiB), and peak CUDA memory if CUDA was used."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = ru / 1024.0 if sys.platform != "darwin" else ru / 2**20
    out = {"peak_rss_mib": round(mib, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def write_json(path: str, obj) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, torch.Tensor):
            return o.detach().cpu().tolist()
        return str(o)

    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=default)
        f.write("\n")


def display_axes(affine: np.ndarray):
    """(orientation, canonical spacing) to show a volume in RAS+ order with nibabel's orientation tools."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return ornt, spacing[ornt[:, 0].astype(int)]


def _canonical(vol: np.ndarray, ornt) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.apply_orientation(vol, ornt)


def _planes(a: np.ndarray, sp, center=None):
    """Radiological views of a canonical RAS+ array: axial (right on the image's left, anterior up),
    coronal and sagittal (superior up). Returns [(image, aspect)]."""
    c = [s // 2 for s in a.shape] if center is None else center
    ax = a[::-1, ::-1, c[2]].T                 # rows: anterior→posterior, cols: right→left
    co = a[::-1, c[1], ::-1].T                 # rows: superior→inferior, cols: right→left
    sa = a[c[0], ::-1, ::-1].T                 # rows: superior→inferior, cols: anterior→posterior
    return [(ax, sp[1] / sp[0]), (co, sp[2] / sp[0]), (sa, sp[2] / sp[1])]


def save_figure(path: str, truth_hu: Optional[np.ndarray], recon_hu: np.ndarray, affine: np.ndarray, projections,
                title: str, metrics: Optional[Dict[str, object]], residuals: Optional[Sequence[float]] = None,
                window=(-1000.0, 600.0), error_window: float = 200.0, view_labels=None, proj_aspect: float = 1.0,
                dpi: int = 80) -> None:
    """Axial / coronal / sagittal slices through the centre of truth, reconstruction and error (HU), a few
    projections, and (for iterative methods) the residual history. Without a truth (measured projections)
    only the reconstruction's row is drawn and ``metrics`` may be None."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    ornt, sp = display_axes(affine)
    R = _canonical(np.asarray(recon_hu, dtype=np.float32), ornt)
    rows = [("reconstruction", R, "gray", window)]
    if truth_hu is not None:
        T = _canonical(np.asarray(truth_hu, dtype=np.float32), ornt)
        rows = [("truth", T, "gray", window), rows[0],
                ("error (recon − truth)", R - T, "RdBu_r", (-error_window, error_window))]
    n = len(rows)
    fig = plt.figure(figsize=(14, 12.5 if n == 3 else 7.5))
    outer = GridSpec(2, 1, figure=fig, height_ratios=[n, 0.85], hspace=0.16)
    top = outer[0].subgridspec(max(n, 2) if residuals else n, 6, width_ratios=[1, 1, 1, 0.05, 0.3, 1.2],
                               wspace=0.12, hspace=0.15)
    bottom = outer[1].subgridspec(1, 4, wspace=0.1)
    names = ("axial", "coronal", "sagittal")
    for ri, (label, vol, cmap, (lo, hi)) in enumerate(rows):
        for ci, (img, aspect) in enumerate(_planes(vol, sp)):
            axp = fig.add_subplot(top[ri, ci])
            im = axp.imshow(img, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            axp.set_xticks([])
            axp.set_yticks([])
            if ri == 0:
                axp.set_title(names[ci], fontsize=11)
            if ci == 0:
                axp.set_ylabel(label, fontsize=11)
        cb = fig.colorbar(im, cax=fig.add_subplot(top[ri, 3]))
        cb.set_label("HU", fontsize=9)
    # right column: metrics text and residual history
    axt = fig.add_subplot(top[0, 5])
    axt.axis("off")
    metrics = metrics or {}
    lines = [f"PSNR {metrics.get('psnr_db')} dB", f"SSIM {metrics.get('ssim')}",
             f"RMSE {metrics.get('rmse_hu')} HU", f"FOV voxels {metrics.get('fov_voxels')}"] if metrics else \
        ["no truth given:", "no metrics"]
    dr = metrics.get("data_range", {}).get("hu")
    if dr:
        lines.append(f"data range {dr[0]:.0f}..{dr[1]:.0f} HU")
    axt.text(0.0, 0.9, "\n".join(lines), va="top", ha="left", fontsize=11, family="monospace")
    if residuals:
        axr = fig.add_subplot(top[1:, 5])
        axr.semilogy(np.arange(1, len(residuals) + 1), residuals, "-o", ms=3)
        axr.set_xlabel("iteration")
        axr.set_title("‖Ax − b‖ / ‖b‖", fontsize=10)
        axr.grid(True, which="both", alpha=0.3)
        axr.yaxis.tick_right()
    # bottom row: projections
    p = np.asarray(projections)
    V = p.shape[0]
    picks = sorted(set(int(round(f * V)) % V for f in (0.0, 0.125, 0.25, 0.375)))
    pmax = float(np.percentile(p, 99.9)) or 1.0
    for ci, vi in enumerate(picks[:4]):
        axp = fig.add_subplot(bottom[0, ci])
        axp.imshow(p[vi], cmap="gray", vmin=0, vmax=pmax, aspect=proj_aspect)
        axp.set_xticks([])
        axp.set_yticks([])
        lab = view_labels[vi] if view_labels is not None else f"view {vi}"
        axp.set_title(f"projection: {lab}", fontsize=10)
    fig.suptitle(title, fontsize=12)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
