"""Held-out validation: a fixed, rendered set of CTs that training never sees, and the metrics on it.

The split is by CT identity (:attr:`xwin.train.datasets.CTPool.identities`): a validation CT is never in
the training pool (checked when the run starts). Without ``--ct`` (the tiny config) the validation CTs are
procedural phantoms with their own seeds (``val.phantom_seeds``, disjoint from the training phantoms'
``0..data.phantoms-1``); with ``--ct`` the ``val.holdout_cts`` files chosen by a seeded permutation are
moved out of training. Real radiographs: ``val.holdout_cxr`` files are moved out of training the same way;
with the single embedded radiograph there is nothing to hold out, so validation uses fixed crops of it.

Every validation CT is rendered once, at the same ``n_targets`` actions (drawn once from ``val.seed``),
so two retrieval tasks separate cleanly:

* **CT retrieval**: for each (CT, action) prediction, the most similar target among the V targets of the
  same action (one per CT) is the right CT. Chance 1/V.
* **yaw retrieval**: among the N targets of the right CT, the most similar is the right action.
  Chance 1/N.

Also: symmetric InfoNCE over all V·N pairs (centred like training when ``loss.center_latents``), the
patch-token MSE of the view predictor's predicted tokens against the EMA encoder's tokens of the target
views, the mean cosine similarity between EMA-encoder features of real radiographs and of simulated
frontal views (the paper reports 0.845 without / 0.967 with domain adaptation), and f_c's balanced
accuracy (real radiograph tokens vs predicted simulated tokens). The same metrics on a fixed set of
*training* CTs (``train_eval/``) show the generalisation gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List

import torch
import torch.nn.functional as F

from .. import losses as L
from ..render import Renderer, actions_to_model

__all__ = ["EvalSet", "make_eval_set", "make_eval_sets", "evaluate"]


@dataclass
class EvalSet:
    """Fixed images of one evaluation set: V CTs × N actions, plus R real radiograph crops."""

    name: str
    identities: List[Hashable]
    context: torch.Tensor        # (V, 1, S, S)
    targets: torch.Tensor        # (V, N, 1, S, S)
    actions: torch.Tensor        # (V, N, 3) degrees (the same N actions for every CT)
    real: torch.Tensor           # (R, 1, S, S)


def fixed_actions(renderer: Renderer, gen: torch.Generator) -> torch.Tensor:
    """N actions (N, 3) in degrees drawn once with the renderer's own sampler (so they obey its options)."""
    return renderer.sample_actions(1, gen)[0]


def make_eval_set(name: str, pool, indices, renderer: Renderer, actions: torch.Tensor, real: torch.Tensor,
                  keys) -> EvalSet:
    """Render CTs ``indices`` of ``pool`` at the same ``actions`` (N, 3) (``keys``: render-cache keys)."""
    cts = [pool.get(i) for i in indices]
    acts = actions[None].expand(len(cts), -1, -1).contiguous()
    ctx, tgt = renderer.render(cts, acts, keys=list(keys))
    ids = pool.identities
    return EvalSet(name, [ids[i] for i in indices], ctx, tgt, acts, real)


def make_eval_sets(s, pools) -> List[EvalSet]:
    """The held-out set ``val`` (every validation CT) and ``train_eval`` (the first ``val.train_eval_cts``
    training CTs), with the same fixed actions and real crops, drawn from a generator seeded by ``val.seed``
    (the training generator is not touched, so validation never changes a training run)."""
    c = s.cfg
    gen = torch.Generator().manual_seed(c.val.seed)
    actions = fixed_actions(s.renderer, gen)
    real = pools.val_rads.sample(c.val.real_crops, c.model.img_size, gen, tuple(c.data.real_crop_scale),
                                 tuple(c.data.real_crop_ratio), normalize=c.render.normalize)
    vi = list(range(len(pools.val)))
    sets = [make_eval_set("val", pools.val, vi, s.renderer, actions, real, [("val", i) for i in vi])]
    ti = list(range(min(c.val.train_eval_cts, len(pools.train))))
    if len(ti) >= 2:
        sets.append(make_eval_set("train_eval", pools.train, ti, s.renderer, actions, real, ti))
    return sets


@torch.no_grad()
def evaluate(model, target, es: EvalSet, loss_cfg, amp) -> Dict[str, float]:
    """Validation metrics of ``model`` (context encoder + view predictor + f_c) and the EMA ``target``."""
    was = model.training
    model.eval()
    try:
        V, N = es.targets.shape[:2]
        with amp():
            z, z_patch = model.predict_views(es.context, actions_to_model(es.actions).to(es.context.device))
            h = target(torch.cat([es.targets.flatten(0, 1), es.context, es.real]))
        z, z_patch, h = z.float(), z_patch.float(), h.float()
        t_patch = h[: V * N].reshape(V, N, *h.shape[1:])
        t = t_patch.mean(dim=2)
        zf, tf = z.flatten(0, 1), t.flatten(0, 1)
        if loss_cfg.center_latents:
            zf, tf = zf - zf.mean(0, keepdim=True), tf - tf.mean(0, keepdim=True)
        zn = F.normalize(zf, dim=1).reshape(V, N, -1)
        tn = F.normalize(tf, dim=1).reshape(V, N, -1)
        # CT retrieval: same action k, which of the V CTs? sim[k, i, j] = cos(z_ik, t_jk)
        sim_ct = torch.einsum("ikd,jkd->kij", zn, tn)
        ct_top1 = (sim_ct.argmax(-1) == torch.arange(V, device=zn.device)).float().mean()
        # yaw retrieval: same CT i, which of the N actions? sim[i, k, l] = cos(z_ik, t_il)
        sim_yaw = torch.einsum("ikd,ild->ikl", zn, tn)
        yaw_top1 = (sim_yaw.argmax(-1) == torch.arange(N, device=zn.device)).float().mean()
        feats = F.normalize(h.mean(dim=1), dim=1)
        sim_front, real = feats[V * N: V * N + V], feats[V * N + V:]
        fc_acc = L.classifier_accuracy(model.domain_classifier, h[V * N + V:], z_patch)
        return {
            "infonce": float(L.info_nce(zf, tf, loss_cfg.temperature)),
            "ct_top1": float(ct_top1), "ct_chance": 1.0 / V,
            "yaw_top1": float(yaw_top1), "yaw_chance": 1.0 / N,
            "patch_mse": float(F.mse_loss(z_patch, t_patch)),
            "real_sim_cos": float((real @ sim_front.t()).mean()),
            "fc_acc": float(fc_acc),
        }
    finally:
        model.train(was)
