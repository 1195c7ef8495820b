"""Second-stage training of the projection decoder on a frozen world model, and its CLI (see :mod:`xwin.decoder`)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import XwinError
from .data import (
    context_image,
    load_entry,
    load_world_model,
    model_frontal,
    predict_view_tokens,
    render_line_integrals,
    safe_load,
    training_entries,
    yaw_grid,
)
from .network import DECODER_KIND, DecoderConfig, DecoderError, ProjectionDecoder, decoder_loss, projection_targets

__all__ = ["build_token_cache", "train_decoder", "load_decoder", "train_stage", "main"]



# ------------------------------------------------------------------------------------------- training

def _lr(step: int, c: DecoderConfig) -> float:
    if step < c.warmup_steps:
        return c.start_lr + (c.lr - c.start_lr) * step / max(1, c.warmup_steps)
    t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.final_lr + (c.lr - c.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_torch_save(obj, path: Path) -> None:
    from ..train.checkpoint import atomic_save  # the training checkpoints' writer (fsync + rename)

    atomic_save(obj, path)


@torch.no_grad()
def build_token_cache(model, world_cfg: dict, entries: Sequence[tuple], yaws: np.ndarray, percentile: float,
                      device="cpu", log=None, context_tokens: bool = False):
    """Predicted tokens (K, V, P, D), targets p/s (K, V, S, S), scales s (K,) of the training CTs and, with
    ``context_tokens``, the encoder's tokens of their frontal views (K, P, D) (else None)."""
    from ..intensity import hu_to_mu

    toks, tgts, scales, ctxs = [], [], [], []
    act = torch.zeros(1, len(yaws), int(world_cfg["model"].get("action_dim", 3)))
    act[0, :, 0] = torch.deg2rad(torch.as_tensor(yaws, dtype=torch.float64)).float()
    i0 = int(np.argmin(np.abs(yaws)))
    for k, e in enumerate(entries):
        vol = load_entry(e, world_cfg)
        mu = hu_to_mu(vol.data.float()).to(device)
        p, _ = render_line_integrals(mu, vol.affine, yaws, world_cfg)
        t, s = projection_targets(p, i0, percentile)
        ctx = context_image(model_frontal(vol, world_cfg, p[i0]), world_cfg).to(device)
        toks.append(predict_view_tokens(model, ctx, act.to(device))[0].float().cpu())
        if context_tokens:
            ctxs.append(model.encoder(ctx)[0].float())
        tgts.append(t.cpu())
        scales.append(s)
        if log:
            log(f"decoder data: CT {k + 1}/{len(entries)} ({e[0]} {e[1] if e[1] is not None else ''}) s = {s:.3f}")
    return (torch.stack(toks), torch.stack(tgts), torch.tensor(scales, dtype=torch.float64),
            torch.stack(ctxs) if context_tokens else None)


def train_decoder(checkpoint, out_dir, config: Optional[dict] = None, *, ct: Sequence[str] = (), device="cpu",
                  resume: bool = True, stop_after: Optional[int] = None, progress: bool = False,
                  log=None) -> Path:
    """Train a projection decoder after a world model (second stage); returns the path of ``decoder.pt``.

    ``out_dir`` gets ``decoder_config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (resume state) and, when
    the schedule is done, ``decoder.pt`` (the decoder, its config, the prior scale, the yaw grid and the
    name of the world-model checkpoint). ``ct``: the world model's ``--ct`` sources, if it had any.
    """
    log = log or (lambda m: None)
    dcfg = DecoderConfig.from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint)
    model, wcfg, wstep = load_world_model(ckpt_path, device)
    mc = wcfg["model"]
    yaws = yaw_grid(wcfg, dcfg.yaw_step)
    entries = training_entries(wcfg, ct) + [("phantom", dcfg.extra_phantom_seed0 + i) for i in range(dcfg.extra_phantoms)]
    t0 = time.perf_counter()
    ft = dcfg.finetune_predictor
    toks, tgts, scales, ctxt = build_token_cache(model, wcfg, entries, yaws, dcfg.scale_percentile, device, log,
                                                 context_tokens=ft)
    t_cache = time.perf_counter() - t0
    predictor = model.view_predictor if ft else None
    del model
    K, V, P, D = toks.shape
    torch.manual_seed(dcfg.seed)
    grid = int(round(math.sqrt(P)))
    dec = ProjectionDecoder(grid, int(mc.get("patch_size", 16)), D, dcfg.width, dcfg.depth, dcfg.heads,
                            dcfg.refine_channels).to(device)
    groups = []
    for mod, scale in ((dec, 1.0),) + (((predictor, dcfg.predictor_lr_scale),) if ft else ()):
        mod.train()
        ps = list(mod.parameters())
        for p in ps:
            p.requires_grad_(True)
        groups += [{"params": [p for p in ps if p.ndim > 1], "weight_decay": dcfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=dcfg.start_lr)
    acts = torch.zeros(V, 1, int(mc.get("action_dim", 3)), device=device)
    acts[:, 0, 0] = torch.deg2rad(torch.as_tensor(yaws, dtype=torch.float64)).float()
    gen = torch.Generator().manual_seed(dcfg.seed * 7919 + 17)
    state_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    cfg_record = {"decoder": asdict(dcfg), "world_checkpoint": str(ckpt_path.resolve()), "world_step": wstep}
    start = 0
    if resume and state_path.exists():
        st = safe_load(state_path)
        if st.get("record", {}).get("decoder") != cfg_record["decoder"]:
            raise DecoderError(f"{state_path} was written with another decoder config; use another folder")
        dec.load_state_dict(st["decoder"])
        if ft:
            predictor.load_state_dict(st["view_predictor"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        start = int(st["step"])
        if metrics_path.exists():
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(k + "\n" for k in keep))
    else:
        metrics_path.write_text("")
    (out / "decoder_config.json").write_text(json.dumps(cfg_record, indent=2) + "\n")
    flat_t, flat_y = toks.reshape(K * V, P, D).to(device), tgts.reshape(K * V, *tgts.shape[-2:]).to(device)
    end = dcfg.steps if stop_after is None else min(dcfg.steps, int(stop_after))
    bar = None
    if progress and end > start:
        from tqdm.auto import tqdm
        bar = tqdm(total=end, initial=start, desc="decoder", file=sys.stderr, dynamic_ncols=True)

    def extra_state():
        return {"view_predictor": predictor.state_dict()} if ft else {}

    def save(step):
        _atomic_torch_save({"step": step, "decoder": dec.state_dict(), "optimizer": opt.state_dict(), **extra_state(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "record": cfg_record}, state_path)

    t1 = time.perf_counter()
    with open(metrics_path, "a") as mf:
        dec.train()
        for step in range(start, end):
            lr = _lr(step, dcfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            idx = torch.randint(0, K * V, (min(dcfg.batch_size, K * V),), generator=gen).to(device)
            if ft:
                tok = predictor(ctxt[idx // V], acts[idx % V])[:, 0]
            else:
                tok = flat_t[idx]
            pred = dec(tok)
            ls = decoder_loss(pred, flat_y[idx], dcfg.structural, dcfg.lambda_structural)
            opt.zero_grad(set_to_none=True)
            ls["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(trainable, dcfg.clip_grad)
            opt.step()
            rec = {"step": step + 1, "lr": lr, "grad_norm": float(gn), **{k: float(v.detach()) for k, v in ls.items()}}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"decoder loss is not finite at step {step + 1}")
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if (step + 1) % dcfg.ckpt_every == 0 or step + 1 == end:
                save(step + 1)
    if bar is not None:
        bar.close()
    final = out / "decoder.pt"
    if end == dcfg.steps:
        _atomic_torch_save({
            "kind": DECODER_KIND, "decoder": dec.state_dict(), "decoder_config": asdict(dcfg), **extra_state(),
            "arch": {"grid": grid, "patch_size": int(mc.get("patch_size", 16)), "embed_dim": D},
            "prior_scale": float(scales.mean()), "train_scales": scales.tolist(), "yaws_deg": yaws.tolist(),
            "train_cts": [f"{k}:{w}" if w is not None else k for k, w in entries],
            "world_checkpoint": ckpt_path.name,
            "world_checkpoint_rel": os.path.relpath(ckpt_path.resolve(), out.resolve()), "world_step": wstep, "steps": dcfg.steps,
            "time_s": {"token_cache": round(t_cache, 2), "train_this_run": round(time.perf_counter() - t1, 2)},
        }, final)
        log(f"decoder: {end} steps, wrote {final}")
    return final


def load_decoder(path, device="cpu") -> Tuple[ProjectionDecoder, dict]:
    """``(decoder, meta)`` from a ``decoder.pt`` written by :func:`train_decoder` (safe loading)."""
    d = safe_load(path)
    if d.get("kind") != DECODER_KIND:
        raise DecoderError(f"{path} is not a projection-decoder file (train one with xwin.decoder.train_decoder)")
    c = DecoderConfig.from_dict(d["decoder_config"])
    a = d["arch"]
    dec = ProjectionDecoder(a["grid"], a["patch_size"], a["embed_dim"], c.width, c.depth, c.heads, c.refine_channels)
    dec.load_state_dict(d["decoder"])
    dec.to(device).eval()
    meta = {k: v for k, v in d.items() if k != "decoder"}
    return dec, meta


def train_stage(run_dir, cfg: Optional[dict] = None, *, ct: Sequence[str] = (), device="cpu",
                progress: bool = False) -> Path:
    """The decoder stage for the end of ``python -m xwin.train``: trains on ``RUN/checkpoint.pt`` (frozen)
    into ``RUN/decoder/`` and returns the path of ``RUN/decoder/decoder.pt``. ``cfg``: the training config
    (its optional ``"decoder"`` section overrides :class:`DecoderConfig`); ``ct``: the run's ``--ct``."""
    run = Path(run_dir)
    dsec = dict((cfg or {}).get("decoder") or {})
    return train_decoder(run / "checkpoint.pt", run / "decoder", dsec, ct=ct, device=device, progress=progress,
                         log=lambda m: print(f"[xwin.decoder] {m}", file=sys.stderr))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xwin.decoder RUN [--ct ...] [--set key=value ...]``: the decoder stage on ``RUN/checkpoint.pt``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m xwin.decoder", description="Train the projection decoder on a "
                                "frozen X-WIN world model (second stage); writes RUN/decoder/decoder.pt.")
    p.add_argument("run", help="world-model run folder (holds checkpoint.pt)")
    p.add_argument("--ct", nargs="+", default=[], help="the world model's --ct sources, if it was trained with any")
    p.add_argument("--out", default=None, help="decoder folder (default RUN/decoder)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="decoder config entries, e.g. steps=300")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = {}
    try:
        for kv in a.set:
            if "=" not in kv:
                raise DecoderError(f"--set {kv!r} must look like key=value")
            k, v = kv.split("=", 1)
            try:
                cfg[k] = json.loads(v)
            except json.JSONDecodeError:
                cfg[k] = v
        out = Path(a.out) if a.out else Path(a.run) / "decoder"
        path = train_decoder(Path(a.run) / "checkpoint.pt", out, cfg, ct=a.ct, device=a.device,
                             progress=not a.no_progress, log=lambda m: print(f"[xwin.decoder] {m}", file=sys.stderr))
    except XwinError as e:
        print(f"python -m xwin.decoder: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
