"""The training loop: set up data, model and optimiser, resume, run the steps, write the run folder."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ..model import build_model
from ..render import Renderer
from .checkpoint import atomic_save, atomic_write_text, check_resumable, rng_state, set_rng_state
from .config import TrainConfig, as_config
from .datasets import Pools, build_pools, sample_distinct
from .distributed import all_gather_objects, dist_setup, is_dist, replica_divergence
from .plot import plot_run
from .schedules import lr_at, momentum_at, param_groups, wd_at
from .step import TrainState, train_step
from .validation import EvalSet, evaluate, make_eval_sets

__all__ = ["train", "build_state"]


def build_state(c: TrainConfig, pools: Pools, dev: torch.device, rank: int, world: int) -> TrainState:
    """Renderer, model, EMA target, optimiser over the given data pools."""
    pool, rads = pools.train, pools.rads
    pool.get(0)  # fail early and clearly on an unreadable first entry
    rads.get(0)
    if len(pool) < c.batch_size:
        sample_distinct(len(pool), c.batch_size, torch.Generator())  # raises the clear error
    torch.manual_seed(c.seed)
    model, target = build_model(c.model)
    model.to(dev)
    target.to(dev)
    opt = torch.optim.AdamW(param_groups(model), lr=c.optim.start_lr, betas=tuple(c.optim.betas), weight_decay=0.0)
    ddp = model
    if is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
    return TrainState(
        cfg=c, device=dev, pool=pool, rads=rads, renderer=Renderer(c.render, img_size=c.model.img_size), model=model,
        target=target, ddp=ddp, opt=opt, gen=torch.Generator().manual_seed(c.seed * 1_000_003 + 7919 * rank + 1),
        total=c.steps, peak_lr=c.optim.lr * c.batch_size * world / c.optim.lr_ref_batch,
        amp=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext,
        params=[p for p in model.parameters() if p.requires_grad])


def _resume(s: TrainState, ckpt_path: Path, metrics_path: Path, cfg: dict, rank: int, world: int) -> int:
    """Load the run folder's checkpoint into ``s`` (refusing another config); returns its step."""
    from ..model import safe_load

    ck = safe_load(ckpt_path, map_location=s.device)
    check_resumable(ck, cfg, world, ckpt_path)
    s.model.load_state_dict(ck["model"])
    s.target.load_state_dict(ck["target_encoder"])
    s.opt.load_state_dict(ck["optimizer"])
    s.gen.set_state(ck["data_rng"][rank])
    set_rng_state(ck["rng"][rank], s.device)
    start = int(ck["step"])
    if rank == 0:
        print(f"xwin.train: resuming from step {start} ({ckpt_path})", file=sys.stderr)
        if metrics_path.exists():  # drop lines logged after the checkpoint by a run that died
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start]
            atomic_write_text("".join(k + "\n" for k in keep), metrics_path)
    return start


def _save(s: TrainState, step: int, cfg: dict, path: Path, rank: int, world: int) -> None:
    rng, gens = all_gather_objects(rng_state(s.device)), all_gather_objects(s.gen.get_state())
    if rank == 0:
        o = s.cfg.optim
        atomic_save({
            "step": step, "config": cfg, "model_config": cfg["model"], "world_size": world,
            "model": s.model.state_dict(), "target_encoder": s.target.state_dict(),
            "optimizer": s.opt.state_dict(), "rng": rng, "data_rng": gens,
            "schedule": {"lr": lr_at(step, s.total, o, s.peak_lr), "wd": wd_at(step, s.total, o),
                         "momentum": momentum_at(step, s.total, o), "peak_lr": s.peak_lr},
        }, path)


class _Log:
    """metrics.jsonl lines and the tqdm bar (rank 0 only)."""

    def __init__(self, path: Path, rank: int, progress: bool, start: int, end: int, name: str):
        self.f = open(path, "a") if rank == 0 else None
        self.bar = None
        if progress and rank == 0 and end > start:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=end, initial=start, desc=f"x-win {name}", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, rec: dict, write: bool) -> None:
        if self.f is not None and write:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if self.bar is not None and "loss" in rec:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", align=f"{rec['align']:.3f}", top1=f"{rec['top1']:.2f}",
                                 refresh=False)

    def close(self) -> None:
        for x in (self.bar, self.f):
            if x is not None:
                x.close()


def _validate(s: TrainState, sets: List[EvalSet]) -> dict:
    out = {}
    for es in sets:
        out.update({f"{es.name}/{k}": v for k, v in evaluate(s.model, s.target, es, s.cfg.loss, s.amp).items()})
    return out


def _summary(s: TrainState, history: List[dict], evals: List[dict], start: int, end: int, wall: float,
             world: int) -> dict:
    c = s.cfg
    k = max(1, min(20, len(history) // 5))
    first, last = history[:k], history[-k:]
    step_total = sum(r["step_time"] for r in history)

    def avg(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    at1 = (lambda key: history[0][key] if start == 0 and history else float("nan"))
    return {
        "config": c.name, "steps_done": end, "steps_total": c.steps, "steps_this_run": len(history),
        "world_size": world, "device": str(s.device), "batch_per_rank": c.batch_size,
        "targets_per_ct": c.render.n_targets, "chance_top1": 1.0 / (c.batch_size * c.render.n_targets),
        "wall_seconds": wall, "mean_step_seconds": step_total / max(1, len(history)),
        "render_fraction": sum(r["render_time"] for r in history) / step_total if step_total > 0 else float("nan"),
        "views_rendered": s.renderer.views_rendered, "average_over_steps": k,
        "align_step1": at1("align"), "top1_step1": at1("top1"),
        "align_start": avg(first, "align"), "align_end": avg(last, "align"),
        "top1_start": avg(first, "top1"), "top1_end": avg(last, "top1"),
        "loss_start": avg(first, "loss"), "loss_end": avg(last, "loss"),
        "patch_mse_start": avg(first, "patch_mse"), "patch_mse_end": avg(last, "patch_mse"),
        "replica_max_abs_diff": replica_divergence([s.model, s.target]), "ct_pool": s.pool.describe(),
        "radiographs": len(s.rads),
        "validation_first": evals[0] if evals else None, "validation_last": evals[-1] if evals else None,
    }


def train(cfg: Union[dict, TrainConfig], out_dir, ct: Sequence[str] = (), cxr: Sequence[str] = (),
          device: Optional[str] = None, stop_after: Optional[int] = None, resume: bool = True, progress: bool = True,
          plot: bool = True) -> dict:
    """Train X-WIN with ``cfg`` (a :func:`~xwin.train.load_config` dict or a :class:`TrainConfig`), writing the
    run folder ``out_dir``: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json``, ``curve.png``.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, keeping the schedule of
    ``cfg['steps']`` — a later call with the same folder resumes. Returns the summary dict (every rank).
    """
    c, plain = as_config(cfg)
    rank, world, dev = dist_setup(device)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if is_dist():
        torch.distributed.barrier()
    pools = build_pools(c, ct, cxr, dev)
    s = build_state(c, pools, dev, rank, world)
    sets = make_eval_sets(s, pools) if c.val.every and rank == 0 else []
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    start = _resume(s, ckpt_path, metrics_path, plain, rank, world) if resume and ckpt_path.exists() else 0
    if rank == 0:
        if start == 0:
            metrics_path.write_text("")
        atomic_write_text(json.dumps(plain, indent=2) + "\n", out / "config.json")

    end = c.steps if stop_after is None else min(c.steps, int(stop_after))
    history, evals = [], []
    log = _Log(metrics_path, rank, progress, start, end, c.name)
    t_loop = time.perf_counter()
    try:
        s.model.train()
        if sets and start == 0:
            evals.append({"step": 0, **_validate(s, sets)})
            log(evals[-1], write=True)
        for step in range(start, end):
            rec = train_step(s, step)
            history.append(rec)
            is_val = bool(sets) and ((step + 1) % c.val.every == 0 or step + 1 == end)
            if is_val:
                evals.append({"step": step + 1, **_validate(s, sets)})
                rec = {**rec, **evals[-1]}
            log(rec, write=is_val or (step + 1) % c.log_every == 0 or step + 1 == end)
            if (step + 1) % c.ckpt_every == 0 or step + 1 == end:
                _save(s, step + 1, plain, ckpt_path, rank, world)
    finally:
        log.close()

    summary = _summary(s, history, evals, start, end, time.perf_counter() - t_loop, world)
    if rank == 0:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
        if plot and end == c.steps and len(history) > 1:
            try:
                plot_run(out, out / "curve.png")
            except Exception as e:  # a missing display backend must not fail a finished run
                print(f"[xwin.train] could not plot: {e}", file=sys.stderr)
    return summary
