"""A tiny random X-WIN world model saved as a checkpoint, for the decoder and --from-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_CFG = {
    "name": "test-tiny",
    "model": {"size": "tiny", "img_size": 32, "patch_size": 8, "in_chans": 1, "pred_width": 64,
              "view_pred_depth": 1, "mask_pred_depth": 1, "pred_heads": 2, "action_dim": 3, "cls_hidden": 16},
    "render": {"size": 32, "method": "siddon", "n_targets": 4, "yaw_range": [-90, 90], "yaw_step": 45,
               "cache": True},
    "data": {"ct_shape": [24, 24, 20], "ct_spacing": [12.0, 12.0, 14.0], "phantoms": 2, "sample_ct": False},
}

FAST_DECODER = {"width": 32, "depth": 1, "heads": 2, "refine_channels": 4, "steps": 4, "batch_size": 4,
                "warmup_steps": 1, "ckpt_every": 2, "extra_phantoms": 1}


def tiny_world_checkpoint(run_dir) -> Path:
    """``run_dir/checkpoint.pt`` holding a randomly initialised world model (plain weights) and its config."""
    from xwin.model import build_model

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, target = build_model(TINY_CFG["model"])
    path = run / "checkpoint.pt"
    torch.save({"step": 0, "config": TINY_CFG, "model_config": TINY_CFG["model"], "model": model.state_dict(),
                "target_encoder": target.state_dict()}, path)
    return path


@pytest.fixture
def one_torch_thread():
    """The tests run with one torch thread (a shared 2-core machine); the count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
