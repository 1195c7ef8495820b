"""Checkpoints: atomic writes, RNG state as plain types, safe loading and the resume check.

A checkpoint (``checkpoint.pt``) holds only tensors, numbers, strings and plain containers, so it is
read with ``torch.load(weights_only=True)`` (:func:`xwin.model.safe_load`): a crafted file cannot run
code. RNG states are stored as tensors and plain numbers (torch, numpy, python, CUDA; per rank), and the
data generator of every rank as its state tensor.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import List

import numpy as np
import torch

from ..errors import XwinError

__all__ = ["ResumeError", "atomic_save", "atomic_write_text", "rng_state", "set_rng_state", "config_diff",
           "check_resumable"]


class ResumeError(XwinError):
    """A run folder's checkpoint cannot be resumed by this run (different config or world size)."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict:
    """This process's torch / numpy / python (/ CUDA) RNG states as tensors and plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": {"version": int(version), "words": torch.tensor(list(words), dtype=torch.int64),
                     "gauss_next": gauss_next}}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def config_diff(old: dict, new: dict, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: old -> new``."""
    out: List[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_resumable(ck: dict, cfg: dict, world: int, path: Path) -> None:
    """Refuse a checkpoint written with another config or world size, naming what differs."""
    # the decoder stage runs after the world model and does not change it: its settings never block a resume
    world_only = [{k: v for k, v in c.items() if k not in ("decoder", "decoder_stage")} for c in (ck.get("config", {}), cfg)]
    diff = config_diff(*world_only)
    if diff:
        raise ResumeError(
            f"{path} was written with a different config ({'; '.join(diff)}). Use another --out, --no-resume to "
            "start over, or the same config to resume. To train in stages, give the final --steps from the start "
            "(the lr/wd/EMA schedules depend on it) and end each stage with --stop-after K.")
    if ck.get("world_size") != world:
        raise ResumeError(f"{path} was written by {ck.get('world_size')} processes, this run has {world}: "
                          "an exact resume needs the same world size")
