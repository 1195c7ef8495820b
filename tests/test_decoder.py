"""Projection decoder: shapes, loss, the per-CT target scale, second-stage training with exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _decoder_helpers import FAST_DECODER, TINY_CFG, one_torch_thread, tiny_world_checkpoint  # noqa: F401

from xwin.decoder import (DecoderConfig, DecoderError, ProjectionDecoder, decoder_loss, gradient_l1, load_decoder,
                          projection_targets, render_line_integrals, safe_load, ssim2d, train_decoder, train_stage,
                          yaw_grid)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_decoder_shapes_and_bad_tokens():
    dec = ProjectionDecoder(grid=4, patch_size=8, embed_dim=32, width=16, depth=1, heads=2, refine_channels=4)
    out = dec(torch.randn(2, 3, 16, 32))
    assert out.shape == (2, 3, 32, 32) and dec.image_size == 32
    assert dec(torch.randn(5, 16, 32)).shape == (5, 32, 32)
    with pytest.raises(DecoderError):
        dec(torch.randn(2, 15, 32))
    # the refiner starts as the identity: output = the patch head's image
    d0 = ProjectionDecoder(grid=4, patch_size=8, embed_dim=32, width=16, depth=1, heads=2, refine_channels=0)
    d0.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith("refine")})
    x = torch.randn(3, 16, 32)
    torch.testing.assert_close(dec(x), d0(x))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.rand(40, 48, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(40, 48, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = float(ssim2d(a, b, data_range=1.0))
    ref = structural_similarity(a.numpy(), b.numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert abs(ours - ref) < 1e-6
    assert float(ssim2d(a, a)) == pytest.approx(1.0, abs=1e-12)


def test_decoder_loss_terms():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 32, 32, generator=g)
    zero = decoder_loss(x, x)
    assert float(zero["loss"]) == pytest.approx(0.0, abs=1e-6)
    shifted = decoder_loss(x + 0.1, x, structural="gradient")
    assert float(shifted["l1"]) == pytest.approx(0.1, abs=1e-6)
    assert float(shifted["structural"]) == pytest.approx(0.0, abs=1e-6)       # a constant shift has no edges
    assert float(gradient_l1(x, torch.zeros_like(x))) > 0.1
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    ls = decoder_loss(noisy, x, structural="ssim", lam=2.0)
    assert float(ls["loss"]) == pytest.approx(float(ls["l1"]) + 2.0 * float(ls["structural"]), rel=1e-6)
    assert 0.0 < float(ls["structural"]) <= 2.0
    p = noisy.clone().requires_grad_(True)
    decoder_loss(p, x)["loss"].backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(DecoderError):
        decoder_loss(x, x[:2])
    with pytest.raises(DecoderError):
        DecoderConfig.from_dict({"structural": "perceptual"})


def test_targets_share_one_scale_per_ct():
    from xwin.data import chest_phantom
    from xwin.intensity import hu_to_mu

    vol = chest_phantom((24, 24, 20), (12.0, 12.0, 14.0), seed=3)
    mu = hu_to_mu(vol.data.float())
    yaws = yaw_grid(TINY_CFG)
    assert list(yaws) == [-90, -45, 0, 45, 90]
    p, g = render_line_integrals(mu, vol.affine, yaws, TINY_CFG)
    t, s = projection_targets(p, frontal_index=2)
    assert s == pytest.approx(float(torch.quantile(p[2].double().flatten(), 0.995)), rel=1e-9)
    torch.testing.assert_close(t * s, p)                          # every view divided by the same s
    assert float(t[0].max()) > float(t[2].max())                  # lateral paths are longer: ratios kept
    # twice the attenuation: same targets, twice the scale (the target does not depend on μ's scale)
    p2, _ = render_line_integrals(2 * mu, vol.affine, yaws, TINY_CFG)
    t2, s2 = projection_targets(p2, frontal_index=2)
    torch.testing.assert_close(t2, t, rtol=1e-5, atol=1e-6)
    assert s2 == pytest.approx(2 * s, rel=1e-5)
    with pytest.raises(DecoderError):
        projection_targets(torch.zeros(2, 8, 8))


@pytest.mark.parametrize("finetune", [False, True])
def test_second_stage_training_resumes_exactly(tmp_path, finetune):
    ckpt = tiny_world_checkpoint(tmp_path / "run")
    cfg = {**FAST_DECODER, "finetune_predictor": finetune}
    full = train_decoder(ckpt, tmp_path / "a", cfg)
    train_decoder(ckpt, tmp_path / "b", cfg, stop_after=2)
    assert not (tmp_path / "b" / "decoder.pt").exists()
    half = train_decoder(ckpt, tmp_path / "b", cfg)
    da, ma = load_decoder(full)
    db, mb = load_decoder(half)
    for (k, va), vb in zip(da.state_dict().items(), db.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ("view_predictor" in ma) == finetune
    for k in ma.get("view_predictor", {}):
        assert torch.equal(ma["view_predictor"][k], mb["view_predictor"][k]), k
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4] and [r["loss"] for r in la] == [r["loss"] for r in lb]
    # world model's 2 training phantoms + 1 extra phantom, their scales and the prior
    assert ma["train_cts"] == ["phantom:0", "phantom:1", "phantom:50000"]
    assert ma["prior_scale"] == pytest.approx(float(np.mean(ma["train_scales"])))
    assert ma["yaws_deg"] == [-90.0, -45.0, 0.0, 45.0, 90.0]
    with pytest.raises(DecoderError, match="another decoder config"):
        train_decoder(ckpt, tmp_path / "b", {**cfg, "lr": 5e-4})


def test_train_stage_writes_decoder_next_to_checkpoint(tmp_path):
    run = tmp_path / "run"
    tiny_world_checkpoint(run)
    path = train_stage(run, {**TINY_CFG, "decoder": {**FAST_DECODER, "steps": 2}})
    assert path == run / "decoder" / "decoder.pt" and path.exists()
    dec, meta = load_decoder(path)
    assert meta["world_checkpoint_rel"] == "../checkpoint.pt" and dec.image_size == 32


def test_safe_load_refuses_code_and_non_checkpoints(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)
    with pytest.raises(DecoderError, match="safely"):
        safe_load(bad)
    with pytest.raises(DecoderError, match="not found"):
        safe_load(tmp_path / "missing.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, plain)
    with pytest.raises(DecoderError, match="not a projection-decoder"):
        load_decoder(plain)


def test_finetuning_the_view_predictor_stores_its_weights(tmp_path):
    from xwin.decoder import load_world_model

    ckpt = tiny_world_checkpoint(tmp_path / "run")
    path = train_decoder(ckpt, tmp_path / "ft", {**FAST_DECODER, "steps": 2, "finetune_predictor": True})
    _, meta = load_decoder(path)
    model, _, _ = load_world_model(ckpt)
    before = model.view_predictor.state_dict()
    after = meta["view_predictor"]
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)      # g_v moved
    from xwin.reconstruct.from_model import Pipeline

    pipe = Pipeline(tmp_path / "ft" / "decoder.pt")                       # the decoder file finds its world model
    for k, v in pipe.model.view_predictor.state_dict().items():
        assert torch.equal(v, after[k])
