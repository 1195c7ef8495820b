"""Strict config, safe checkpoints (no code runs on load), encoder export, resume messages."""

import json

import pytest
import torch

from xwin.errors import XwinError
from xwin.model import CheckpointError, build_model, export_encoder, load_encoder, safe_load
from xwin.train import ConfigError, ResumeError, TrainConfig, load_config, main, train

from test_train import SMALL

TINY = dict(size="tiny", img_size=32, patch_size=8, pred_width=64, view_pred_depth=1, mask_pred_depth=1,
            pred_heads=4, cls_hidden=32)


def test_config_is_typed_and_strict():
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.lamda_mim'; did you mean 'loss.lambda_mim'"):
        load_config("tiny", ["loss.lamda_mim=2"])
    with pytest.raises(ConfigError, match=r"'optim'"):
        load_config("tiny", ["optimm.lr=1"])
    with pytest.raises(ConfigError, match=r"'steps' must be int"):
        load_config("tiny", ["steps=abc"])
    with pytest.raises(ConfigError, match=r"'data.ct_shape' must be a list of 3 int"):
        load_config("tiny", ["data.ct_shape=[64,64]"])
    with pytest.raises(XwinError, match="render.method"):
        load_config("tiny", ["render.method=nearest"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")
    cfg = load_config("tiny", ["optim.lr=1", "render.yaw_step=null", "render.cache=false"])
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float) and cfg["render"]["yaw_step"] is None
    typed = TrainConfig.from_dict(cfg)
    assert typed.optim.lr == 1.0 and typed.model.size == "tiny" and typed.to_dict() == cfg
    json.dumps(cfg)  # plain JSON types only


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    model, target = build_model(TINY)
    torch.save({"model_config": TINY, "target_encoder": target.state_dict(), "payload": _Evil(str(victim))}, bad)
    assert not victim.exists()
    for load in (safe_load, load_encoder, lambda p: export_encoder(p, tmp_path / "e.safetensors")):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load(bad)
        assert not victim.exists()
    # the training resume refuses it the same way (exit status 2 from the CLI, one line)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(bad.read_bytes())
    assert main(["--config", "tiny", "--out", str(run), "--no-progress", "--no-plot", "--set", *SMALL, "steps=1"]) == 2
    assert not victim.exists()


def test_export_encoder_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    model, target = build_model(TINY)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01)
    ck = {"model_config": TINY, "model": model.state_dict(), "target_encoder": target.state_dict()}
    torch.save(ck, tmp_path / "ck.pt")
    path = export_encoder(tmp_path / "ck.pt", tmp_path / "enc.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["xwin_model_config"]) == TINY and meta["xwin_which"] == "target"
    x = torch.rand(3, 32, 32)
    a, b = load_encoder(path), load_encoder(tmp_path / "ck.pt")
    assert torch.equal(a(x), b(x)) and torch.allclose(a(x), target(x[:, None]).mean(1), atol=1e-6)
    c = load_encoder(export_encoder(ck, tmp_path / "ctx.safetensors", which="context"))
    assert torch.allclose(c(x), model.encoder(x[:, None]).mean(1), atol=1e-6)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an exported X-WIN encoder"):
        load_encoder(other)


def test_resume_message_and_refusal_name_the_keys(tmp_path, capsys):
    cfg = load_config("tiny", SMALL + ["steps=3"])
    run = tmp_path / "r"
    train(cfg, run, stop_after=1, progress=False, plot=False)
    capsys.readouterr()
    train(cfg, run, stop_after=2, progress=False, plot=False)
    assert "resuming from step 1" in capsys.readouterr().err
    with pytest.raises(ResumeError, match=r"steps: 3 -> 4.*--stop-after"):
        train(load_config("tiny", SMALL + ["steps=4"]), run, progress=False, plot=False)
