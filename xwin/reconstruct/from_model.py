"""``python -m xwin.reconstruct --from-model CKPT (--ct CT | --image RADIOGRAPH | --heldout N) --out DIR``:
a CT from one frontal radiograph, through the X-WIN world model and its projection decoder.

1. The frontal (yaw 0) view: simulated from ``--ct`` with the world model's pose and projector, or a real
   radiograph ``--image``; normalised exactly as the world model's inputs.
2. The world model predicts the patch tokens of the views at the yaws of its action grid (default: the
   trained grid over its yaw range, ±90°; ``--yaw-step`` asks for others); the decoder
   (:mod:`xwin.decoder`) turns them into line integrals on the per-CT scale, times ``s`` (from the input's
   frontal line integrals with ``--ct``, the training prior with ``--image``: ``--scale``).
3. Reconstruction on the world model's CT grid (the input CT's own world frame) with xwin's own methods:
   ``fdk`` (FDK over the arc: 180° is less than the π + fan a short scan needs, so it is limited angle),
   ``fdk-mirror`` (the views at yaw + 180° filled in as the detector-flipped views at yaw — exact for parallel
   rays, an approximation for the cone), ``sirt`` / ``tv`` (limited-angle iterative methods with the exact
   projector), ``sirt-prior`` / ``tv-prior`` (the same, started from the mean training CT). ``--methods``
   lists the ones to run (default ``tv,fdk,fdk-mirror,sirt-prior``); the first is written as ``recon.nii.gz``.
4. With ``--ct`` (or ``--heldout``), in the same run, on the same grid, field of view and data range:
   the **upper bound** (the same method on the *true* projections of the same views) and the **lower bound**
   (the voxel-wise mean of the world model's training CTs, each centred on its body like every CT on the
   grid). 2D PSNR/SSIM of decoded vs true views (predicted yaws only, the frontal input excluded).

Outputs: ``recon.nii.gz`` (HU), ``from_model.png`` and ``metrics.json``; ``--heldout N`` evaluates N
phantoms the world model and the decoder never saw (seeds 200000 + i) and writes the table in
``heldout.json`` / ``heldout.md`` and the first CT's figure.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from xwin.errors import XwinError

HELDOUT_SEED0 = 200_000
METHODS = ("fdk", "fdk-mirror", "sirt", "tv", "sirt-prior", "tv-prior")


class FromModelError(XwinError):
    """Raised for unusable options or inputs (turned into one line and exit status 2 by :func:`main`)."""


# ------------------------------------------------------------------------------------------- pipeline

class Pipeline:
    """A frozen world model + projection decoder, ready to turn a frontal view into projections."""

    def __init__(self, ckpt, decoder_path=None, device="cpu"):
        import torch

        from xwin.decoder import load_decoder, load_world_model, safe_load

        ckpt = Path(ckpt)
        head = safe_load(ckpt)
        if head.get("kind") == "xwin-projection-decoder":      # the decoder file itself was given
            decoder_path, ckpt = ckpt, (ckpt.parent / head["world_checkpoint_rel"]).resolve()
            head = safe_load(ckpt)
        if decoder_path is None:
            decoder_path = ckpt.parent / "decoder" / "decoder.pt"
            if not decoder_path.exists():
                raise FromModelError(f"no projection decoder next to {ckpt} (expected {decoder_path}); train one "
                                     f"with xwin.decoder.train_stage('{ckpt.parent}') or give --decoder")
        self.model, self.cfg, self.step = load_world_model(head, device)
        self.decoder, self.meta = load_decoder(decoder_path, device)
        if "view_predictor" in self.meta:           # the decoder stage fine-tuned g_v: use its weights
            self.model.view_predictor.load_state_dict(self.meta.pop("view_predictor"))
        self.device = torch.device(device)
        self.ckpt, self.decoder_path = str(ckpt), str(decoder_path)

    @property
    def img_size(self) -> int:
        return int(self.cfg["model"].get("img_size", 224))

    def yaws(self, step: Optional[float] = None) -> np.ndarray:
        from xwin.decoder import yaw_grid

        return yaw_grid(self.cfg, step)

    def predict(self, context, yaws_deg) -> "torch.Tensor":  # noqa: F821
        """Decoded views ``(V, S, S)`` on the p / s scale (clamped at 0) from a context image (1, 1, S, S)."""
        import torch

        from xwin.decoder import predict_view_tokens

        act = torch.zeros(1, len(yaws_deg), int(self.cfg["model"].get("action_dim", 3)), device=self.device)
        act[0, :, 0] = torch.deg2rad(torch.as_tensor(np.asarray(yaws_deg), dtype=torch.float64)).float()
        with torch.no_grad():
            tok = predict_view_tokens(self.model, context.to(self.device), act)
            return self.decoder(tok)[0].clamp(min=0.0).float().cpu()


def mirror_complete(p, yaws_deg, cfg: dict, iso):
    """Views and geometry completed to a full turn: the view at yaw + 180° is the view at yaw flipped along
    the detector columns (exact for parallel rays; for the cone beam the magnification differs)."""
    import torch

    from xwin.decoder import view_geometry

    y = np.asarray(yaws_deg, dtype=np.float64)
    have = np.mod(y, 360.0)
    opp = np.mod(y + 180.0, 360.0)
    gap = np.abs((opp[:, None] - have[None, :] + 180.0) % 360.0 - 180.0)
    keep = gap.min(axis=1) > 1e-6                       # a conjugate that is already measured is not added
    y2 = np.concatenate([y, y[keep] + 180.0])
    p2 = torch.cat([p, torch.flip(p[torch.as_tensor(np.nonzero(keep)[0])], dims=[-1])])
    return p2, view_geometry(y2, cfg, iso, size=p.shape[-1])


def reconstruct(method: str, p, geom, shape, affine, cfg: dict, yaws, iso, iterations: int = 20, prior=None):
    """μ (1/mm) from line integrals ``p`` (V, S, S) of the views ``geom`` with one of :data:`METHODS`;
    ``*-prior`` methods start the iterations from ``prior`` (the mean training CT) instead of zero, so the
    directions the arc does not measure keep the prior's values."""
    from xwin.reconstruct import fdk, sirt, tv_recon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the arc is known to be short; the doc measures it
        if method == "fdk":
            return fdk(p, geom, shape, affine=affine)
        if method == "fdk-mirror":
            p2, g2 = mirror_complete(p, yaws, cfg, iso)
            return fdk(p2, g2, shape, affine=affine)
        subsets = max(1, min(4, geom.num_views))
        x0 = None
        if method.endswith("-prior"):
            if prior is None:
                raise FromModelError(f"{method} needs the mean training CT")
            method, x0 = method[: -len("-prior")], prior.to(p.dtype).clone()
        if method == "sirt":
            return sirt(p, geom, shape, affine=affine, iterations=iterations, subsets=subsets, x0=x0)
        if method == "tv":
            return tv_recon(p, geom, shape, affine=affine, iterations=iterations, subsets=subsets, x0=x0)
    raise FromModelError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _reorient(data, affine_from, affine_to):
    """Voxel array of grid ``affine_from`` in the axis order/direction of ``affine_to`` (same shape assumed)."""
    import nibabel as nib

    a = nib.orientations.io_orientation(np.asarray(affine_from, dtype=np.float64))
    b = nib.orientations.io_orientation(np.asarray(affine_to, dtype=np.float64))
    return np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(data), nib.orientations.ornt_transform(a, b)))


def mean_training_ct(cfg: dict, like_affine, entries=None):
    """Lower bound: the voxel-wise mean μ of the world model's training CTs on its grid, each centred on its
    body (the grid's crop/pad about the body centroid), in the axis order of ``like_affine``."""
    import torch

    from xwin.decoder import load_entry, training_entries
    from xwin.intensity import hu_to_mu

    entries = entries if entries is not None else training_entries(cfg)
    acc = None
    for e in entries:
        v = load_entry(e, cfg)
        mu = _reorient(hu_to_mu(v.data.float()).numpy(), v.affine, like_affine).astype(np.float64)
        acc = mu if acc is None else acc + mu
    return torch.from_numpy(acc / len(entries)).float()


def view_metrics(pred, true) -> Dict[str, object]:
    """2D PSNR / SSIM (scikit-image) of decoded vs true line integrals, data range = the true views' max − min
    (one range for all views of the CT); per view and the mean."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    t = true.double().numpy()
    r = pred.double().numpy()
    rng = float(t.max() - t.min()) or 1.0
    ps = [float(peak_signal_noise_ratio(t[i], r[i], data_range=rng)) for i in range(len(t))]
    ss = [float(structural_similarity(t[i], r[i], data_range=rng)) for i in range(len(t))]
    return {"psnr_db": round(float(np.mean(ps)), 3), "ssim": round(float(np.mean(ss)), 4),
            "per_view_psnr_db": [round(x, 3) for x in ps], "per_view_ssim": [round(x, 4) for x in ss],
            "data_range": rng, "relative_l1": float(np.abs(r - t).sum() / max(np.abs(t).sum(), 1e-12))}


def evaluate_ct(pipe: Pipeline, vol, *, methods: Sequence[str], yaws, iterations: int = 20, mean_ct=None,
                scales=("frontal", "prior"), log=None) -> dict:
    """Every number of one CT (HU ``vol`` on the model grid): 2D view metrics, 3D metrics of the model's
    reconstructions (each method, each scale), of the upper bound (each method on the true views) and of the
    lower bound (mean training CT). Returns the metrics and the arrays for the figure."""

    from xwin.decoder import context_image, model_frontal, render_line_integrals, volume_center
    from xwin.intensity import hu_to_mu
    from xwin.reconstruct import fov_mask
    from xwin.reconstruct.report import image_metrics

    log = log or (lambda m: None)
    t0 = time.perf_counter()
    cfg = pipe.cfg
    mu = hu_to_mu(vol.data.float())
    shape, affine = tuple(mu.shape), np.asarray(vol.affine, dtype=np.float64)
    iso = volume_center(shape, affine)
    yaws = np.asarray(yaws, dtype=np.float64)
    i0 = int(np.argmin(np.abs(yaws)))
    if not np.isclose(yaws[i0], 0.0):
        raise FromModelError("the yaws must include 0 (the frontal view)")
    p_true, geom = render_line_integrals(mu, affine, yaws, cfg, size=pipe.img_size)
    from xwin.decoder import frontal_scale

    s_frontal = frontal_scale(p_true[i0], pipe.meta["decoder_config"]["scale_percentile"])
    ctx = context_image(model_frontal(vol, cfg, p_true[i0]), cfg)
    dec = pipe.predict(ctx, yaws)
    s_used = {"frontal": s_frontal, "prior": float(pipe.meta["prior_scale"])}
    others = [i for i in range(len(yaws)) if i != i0]
    res: Dict[str, object] = {"scale": {"frontal_s": s_frontal, "prior_s": s_used["prior"]}}
    res["views_2d"] = {k: view_metrics(dec[others] * s_used[k], p_true[others]) for k in scales}
    fov = fov_mask(geom, shape, affine=affine)
    mean_ct = mean_training_ct(cfg, affine) if mean_ct is None else mean_ct
    recs = {}
    for m in methods:
        t1 = time.perf_counter()
        recs[("true", m)] = reconstruct(m, p_true, geom, shape, affine, cfg, yaws, iso, iterations, mean_ct).float()
        for k in scales:
            recs[(k, m)] = reconstruct(m, dec * s_used[k], geom, shape, affine, cfg, yaws, iso, iterations,
                                       mean_ct).float()
        log(f"  {m}: {time.perf_counter() - t1:.1f} s")
    res["volume_3d"] = {f"{k}/{m}": image_metrics(r, mu, fov) for (k, m), r in recs.items()}
    res["volume_3d"]["lower/mean-training-ct"] = image_metrics(mean_ct, mu, fov)
    res["fov_voxels"] = int(fov.sum())
    res["time_s"] = round(time.perf_counter() - t0, 2)
    arrays = {"mu": mu, "affine": affine, "context": ctx[0, 0], "p_true": p_true, "decoded": dec * s_used[scales[0]],
              "recs": recs, "mean_ct": mean_ct, "yaws": yaws}
    return {"metrics": res, "arrays": arrays}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI (:func:`xwin.reconstruct.from_model_cli.main`)."""
    from .from_model_cli import main as _main

    return _main(argv)
