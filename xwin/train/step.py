"""One training step: draw data, render, encode targets with the EMA encoder, one model forward with every
loss, backward, clip, AdamW step, EMA update. Every random draw comes from the rank's data generator, in a
fixed order (that is what makes a resumed run bit-identical)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from ..masks import sample_block_masks
from ..model import VisionTransformer, XWinModel, ema_update, gather_tokens
from ..render import Renderer, actions_to_model
from .config import TrainConfig, section
from .datasets import CTPool, RadiographPool, sample_distinct
from .distributed import mean_across_ranks
from .schedules import lr_at, momentum_at, wd_at

__all__ = ["TrainState", "train_step", "LOGGED"]

# the losses and metrics logged every step (besides grad_norm, schedules and timings)
LOGGED = ["loss", "align", "infonce", "affinity", "top1", "mim", "mim_sim", "mim_real", "domain", "cls", "patch_mse",
          "fc_acc"]


@dataclass
class TrainState:
    """Everything a step needs: config, data, model, optimiser, the rank's data generator."""

    cfg: TrainConfig
    device: torch.device
    pool: CTPool
    rads: RadiographPool
    renderer: Renderer
    model: XWinModel
    target: VisionTransformer
    ddp: torch.nn.Module            # the model, wrapped in DDP when distributed
    opt: torch.optim.Optimizer
    gen: torch.Generator
    total: int
    peak_lr: float
    amp: Callable = nullcontext
    params: List[torch.nn.Parameter] = field(default_factory=list)


def _draw(s: TrainState) -> dict:
    """CT indices, actions, real crops and block masks for one step (all from ``s.gen``)."""
    c, B = s.cfg, s.cfg.batch_size
    idx = sample_distinct(len(s.pool), B, s.gen)
    actions = s.renderer.sample_actions(B, s.gen)
    real = s.rads.sample(B, c.model.img_size, s.gen, tuple(c.data.real_crop_scale), tuple(c.data.real_crop_ratio),
                         normalize=c.render.normalize)
    grid = s.model.encoder.grid
    sim_keep, sim_pred = sample_block_masks(B, grid, c.masks, s.gen)
    real_keep, real_pred = sample_block_masks(B, grid, c.masks, s.gen)
    return dict(idx=idx, actions=actions, real=real, sim_keep=sim_keep, sim_pred=sim_pred, real_keep=real_keep,
                real_pred=real_pred)


@torch.no_grad()
def _targets(s: TrainState, d: dict, ctx: torch.Tensor, tgt: torch.Tensor, pick):
    """EMA-encoder targets: the target views' tokens (patch MSE, f_c) and their mean (alignment), the real
    radiographs' tokens (f_c's real side), layer-normed tokens at the hidden positions of the simulated and
    the real MIM image. Returns (targets, simulated MIM image)."""
    B, n, dev = ctx.shape[0], tgt.shape[1], s.device
    with s.amp():
        imgs = torch.cat([tgt.flatten(0, 1)] + ([] if pick is not None else [ctx]) + [d["real"]])
        h = s.target(imgs)
    h_views = h[: B * n].float().reshape(B, n, *h.shape[1:])
    h_rest = F.layer_norm(h.float(), (h.shape[-1],))
    if pick is not None:
        h_sim = h_rest[torch.arange(B, device=dev) * n + pick]
        sim = tgt[torch.arange(B, device=dev), pick]
    else:
        h_sim = h_rest[B * n: B * n + B]
        sim = ctx
    targets = {
        "align": h_views.mean(dim=2),
        "view_tokens": h_views,
        "real_view_tokens": h[-B:].float(),
        "sim_tokens": gather_tokens(h_sim, d["sim_pred"].to(dev)),
        "real_tokens": gather_tokens(h_rest[-B:], d["real_pred"].to(dev)),
        "groups": torch.arange(B, device=dev).repeat_interleave(n),
    }
    return targets, sim


def train_step(s: TrainState, step: int) -> Dict[str, float]:
    """Run step ``step`` (0-based) and return its log record (rank-averaged losses, schedules, timings)."""
    c, dev = s.cfg, s.device
    t0 = time.perf_counter()
    lr, wd, mom = lr_at(step, s.total, c.optim, s.peak_lr), wd_at(step, s.total, c.optim), momentum_at(step, s.total, c.optim)
    for g in s.opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd if g.get("apply_wd") else 0.0

    d = _draw(s)
    r0 = s.renderer.render_seconds
    ctx, tgt = s.renderer.render([s.pool.get(i) for i in d["idx"]], d["actions"], keys=d["idx"])
    t_render = s.renderer.render_seconds - r0
    # simulated MIM view: one random target view per CT ("target", sees every yaw) or the frontal context
    # view ("context", as the official code)
    pick = (torch.randint(0, tgt.shape[1], (c.batch_size,), generator=s.gen).to(dev)
            if c.loss.mim_sim_view == "target" else None)
    targets, sim = _targets(s, d, ctx, tgt, pick)
    batch = {"context": ctx, "actions": actions_to_model(d["actions"]).to(dev),
             "sim": sim, "sim_keep": d["sim_keep"].to(dev), "sim_pred": d["sim_pred"].to(dev),
             "real": d["real"], "real_keep": d["real_keep"].to(dev), "real_pred": d["real_pred"].to(dev)}
    with s.amp():
        losses = s.ddp(batch, targets, section(c.loss))
    losses["loss"].backward()
    gnorm = torch.nn.utils.clip_grad_norm_(s.params, float(c.optim.clip_grad))
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    ema_update(s.target, s.model.encoder, mom)

    vals = mean_across_ranks(torch.stack([losses[k].detach().float() for k in LOGGED] + [gnorm.detach().float()]))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    rec = {"step": step + 1, **{k: float(v) for k, v in zip(LOGGED + ["grad_norm"], vals.tolist())},
           "lr": lr, "wd": wd, "momentum": mom, "step_time": time.perf_counter() - t0, "render_time": t_render}
    if not all(math.isfinite(rec[k]) for k in LOGGED):
        raise FloatingPointError(f"non-finite loss at step {step + 1}: {rec}")
    return rec
