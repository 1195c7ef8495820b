"""``python -m xwin.train`` / ``xwin-train``: argument parsing, one-line errors, the summary on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ..errors import XwinError

__all__ = ["main"]

DESCRIPTION = "X-WIN world-model training with target projections rendered on the fly."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xwin.train", description=DESCRIPTION)
    p.add_argument("--config", default="tiny", help="built-in config (tiny, paper) or a JSON file")
    p.add_argument("--ct", nargs="+", default=[], help="CT files / folders (NIfTI, DICOM series)")
    p.add_argument("--cxr", nargs="+", default=[], help="real radiograph files / folders (PNG, JPEG, DICOM)")
    p.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides the config)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a checkpoint after this many steps, keeping the schedule of --steps "
                        "(run again with the same --out and config to continue)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set batch_size=8 render.method=trilinear")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run folder has a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write curve.png at the end")
    p.add_argument("--no-decoder", action="store_true",
                   help="skip the projection-decoder stage even if the config has decoder_stage=true")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import load_config
    from .distributed import is_dist
    from .loop import train

    args = _parser().parse_args(argv)
    try:
        overrides = list(args.set)
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        cfg = load_config(args.config, overrides)
        out = args.out or os.path.join("runs", str(cfg.get("name", "run")))
        summary = train(cfg, out, ct=args.ct, cxr=args.cxr, device=args.device, stop_after=args.stop_after,
                        resume=not args.no_resume, progress=not args.no_progress, plot=not args.no_plot)
    except (XwinError, FileNotFoundError, ValueError) as e:
        print(f"xwin.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if is_dist():
            import torch.distributed as dist
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    # second stage (issue 13): the projection decoder on the frozen world model, once the run is complete,
    # on rank 0 only and after the process group is gone (it is a single-process job)
    finished = args.stop_after is None or args.stop_after >= cfg["steps"]
    if cfg.get("decoder_stage") and not args.no_decoder and finished:
        from ..decoder import train_stage

        try:
            dev = args.device or ("cuda" if _cuda() else "cpu")
            summary = {**summary, "decoder": str(train_stage(out, cfg, ct=args.ct, device=dev,
                                                             progress=not args.no_progress))}
        except (XwinError, FileNotFoundError, ValueError) as e:
            print(f"xwin.train: error in the decoder stage: {e}", file=sys.stderr)
            return 2
    print(json.dumps(summary, indent=2))
    return 0
