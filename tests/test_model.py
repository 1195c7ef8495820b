"""The X-WIN model pieces: ViT, predictors, domain classifier, EMA, load_encoder, masks, renderer."""

import math

import numpy as np
import pytest
import torch

from xwin import losses as L
from xwin.masks import BlockMaskConfig, sample_block_masks
from xwin.model import (VIT_SIZES, DomainClassifier, FrozenEncoder, MaskPredictor, ViewPredictor,
                        VisionTransformer, build_model, ema_update, load_encoder,
                        sincos_pos_embed_2d)

TINY = dict(size="tiny", img_size=32, patch_size=8, pred_width=64, view_pred_depth=2, mask_pred_depth=2,
            pred_heads=4, cls_hidden=32)


def test_sincos_pos_embed():
    e = sincos_pos_embed_2d(16, 3, 4)
    assert e.shape == (12, 16)
    q = 4
    # position (0, 0): sin parts 0, cos parts 1
    assert torch.allclose(e[0], torch.tensor([0.0] * q + [1.0] * q + [0.0] * q + [1.0] * q))
    # raster order: row r, column c at index r*4 + c; first frequency is 1 rad per patch
    assert e[1 * 4 + 2, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # row part
    assert e[1 * 4 + 2, 2 * q].item() == pytest.approx(math.sin(2.0), abs=1e-6)  # column part
    assert torch.unique(e, dim=0).shape[0] == 12  # every position distinct
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(6, 2, 2)


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", list(VIT_SIZES))
def test_vit_sizes(size):
    dim, depth, heads = VIT_SIZES[size]
    with torch.device("meta"):
        vit = VisionTransformer(224, 16, 1, dim, depth, heads)
    # 12·d² + 13·d per block (qkv, proj, mlp, 2 norms) + patch embedding + final norm
    want = depth * (12 * dim * dim + 13 * dim) + (16 * 16 + 1) * dim + 2 * dim
    assert _count(vit) == want
    # the published ViT-{Ti,S,B,L}/16 parameter counts (timm, 3-channel input, class token, learned
    # position embedding, 1000-class head) minus exactly those parts we do not have
    published = {"tiny": 5_717_416, "small": 22_050_664, "base": 86_567_656, "large": 304_326_632}[size]
    assert want == published - dim - 197 * dim - (1000 * dim + 1000) - 2 * 16 * 16 * dim
    assert vit.pos_embed.shape == (1, 196, dim)
    assert not any("pos_embed" in n for n, _ in vit.named_parameters())  # fixed, not learned


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 1, 64, 1, 4)
    attn = vit.blocks[0].attn
    x = torch.randn(2, 16, 64)
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
    w = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(16), dim=-1)
    ref = attn.proj((w @ qkv[2]).transpose(1, 2).reshape(b, n, c))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_encoder_shapes_and_keep():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 1, 64, 2, 4)
    x = torch.rand(3, 1, 32, 32)
    full = vit(x)
    assert full.shape == (3, 16, 64)
    all_idx = torch.arange(16).expand(3, 16)
    assert torch.allclose(vit(x, keep=all_idx), full, atol=1e-6)
    keep = torch.tensor([[0, 1, 5], [2, 3, 4], [7, 8, 15]])
    assert vit(x, keep=keep).shape == (3, 3, 64)
    with pytest.raises(ValueError):
        vit(torch.rand(3, 1, 16, 16))
    # no class token and no hidden global state: permuting the batch permutes the output
    assert torch.allclose(vit(x[[2, 0, 1]]), full[[2, 0, 1]], atol=1e-5)


def test_view_predictor_batches_actions_consistently():
    torch.manual_seed(0)
    g = ViewPredictor(grid=4, embed_dim=64, width=32, depth=2, num_heads=4, action_dim=3)
    ctx = torch.randn(2, 16, 64)
    a = torch.randn(2, 5, 3)
    out = g(ctx, a)
    assert out.shape == (2, 5, 16, 64)
    one = g(ctx[1:2], a[1:2, 3:4])
    assert torch.allclose(out[1, 3], one[0, 0], atol=1e-5)
    assert not torch.allclose(out[0, 0], out[0, 1])  # the action changes the prediction
    with pytest.raises(ValueError):
        g(ctx, torch.randn(2, 5, 2))


def test_mask_predictor_shapes_and_position_dependence():
    torch.manual_seed(0)
    g = MaskPredictor(grid=4, embed_dim=64, width=32, depth=2, num_heads=4)
    ctx = torch.randn(2, 6, 64)
    keep = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    pred = torch.tensor([[8, 9, 10], [0, 1, 2]])
    out = g(ctx, keep, pred)
    assert out.shape == (2, 3, 64)
    assert not torch.allclose(out[:, 0], out[:, 1])  # different hidden positions -> different guesses


def test_domain_classifier_frozen_call_matches_and_isolates():
    torch.manual_seed(0)
    fc = DomainClassifier(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    a = fc(x)
    b = fc(x, frozen=True)
    assert torch.equal(a, b)
    b.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in fc.parameters())


def test_ema_update():
    torch.manual_seed(0)
    online = VisionTransformer(32, 8, 1, 64, 1, 4)
    target = VisionTransformer(32, 8, 1, 64, 1, 4)
    t0 = [p.clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), t0))
    ema_update(target, online, 0.75)
    for a, b, o in zip(target.parameters(), t0, online.parameters()):
        assert torch.allclose(a, 0.75 * b + 0.25 * o, atol=1e-7)
    ema_update(target, online, 0.0)
    assert all(torch.equal(a, o) for a, o in zip(target.parameters(), online.parameters()))


def _batch(model, b=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.img_size
    grid = model.encoder.grid
    sk, sp = sample_block_masks(b, grid, BlockMaskConfig(), g)
    rk, rp = sample_block_masks(b, grid, BlockMaskConfig(), g)
    batch = {"context": torch.rand(b, 1, s, s, generator=g), "actions": torch.rand(b, n, 3, generator=g),
             "sim_keep": sk, "sim_pred": sp, "real": torch.rand(b, 1, s, s, generator=g),
             "real_keep": rk, "real_pred": rp}
    batch["sim"] = batch["context"]
    d = model.encoder.embed_dim
    targets = {"align": torch.randn(b, n, d, generator=g), "sim_tokens": torch.randn(b, sp.shape[1], d, generator=g),
               "real_tokens": torch.randn(b, rp.shape[1], d, generator=g),
               "view_tokens": torch.randn(b, n, grid * grid, d, generator=g),
               "real_view_tokens": torch.randn(b, grid * grid, d, generator=g) + 1.0,
               "groups": torch.arange(b).repeat_interleave(n)}
    return batch, targets


LOSS = dict(temperature=0.1, affinity_temperature=0.05, lambda_affinity=0.5, lambda_mim=1.0,
            lambda_domain=0.1, lambda_cls=1.0)


def test_full_forward_losses_and_gradient_routing():
    torch.manual_seed(0)
    model, target = build_model(TINY)
    batch, targets = _batch(model)
    out = model(batch, targets, LOSS)
    for k in ("loss", "align", "infonce", "affinity", "mim", "domain", "cls", "top1"):
        assert torch.isfinite(out[k]), k
    want = out["align"] + out["mim"] + 0.1 * out["domain"] + out["cls"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (DDP would need find_unused_parameters): {missing}"
    # f_c is trained by L_cls alone
    fc_grads = [p.grad.clone() for p in model.domain_classifier.parameters()]
    model.zero_grad(set_to_none=True)
    out = model(batch, targets, LOSS)
    out["cls"].backward()
    for a, p in zip(fc_grads, model.domain_classifier.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
    assert all(p.grad is None for p in model.encoder.parameters())  # L_cls does not reach the encoder


def _grads(model):
    return {part: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, part).parameters())
            for part in ("encoder", "view_predictor", "mask_predictor", "domain_classifier")}


def test_domain_losses_sit_on_the_view_predictor_and_are_isolated():
    """L_cls moves only f_c; L_domain (patch MSE + adversarial) moves the encoder and the view predictor,
    never f_c, and not the mask predictor (it acts on g_v's predicted patch tokens of the target views)."""
    torch.manual_seed(0)
    model, _ = build_model(TINY)
    batch, targets = _batch(model)
    out = model(batch, targets, LOSS)
    out["cls"].backward()
    assert _grads(model) == {"encoder": False, "view_predictor": False, "mask_predictor": False,
                             "domain_classifier": True}
    model.zero_grad(set_to_none=True)
    out = model(batch, targets, LOSS)
    out["domain"].backward()
    assert _grads(model) == {"encoder": True, "view_predictor": True, "mask_predictor": False,
                             "domain_classifier": False}
    # the adversarial half alone also reaches the view predictor and not f_c
    model.zero_grad(set_to_none=True)
    out = model(batch, targets, LOSS)
    (out["domain"] - out["patch_mse"]).backward()
    assert _grads(model)["view_predictor"] and not _grads(model)["domain_classifier"]


def test_predict_views_patch_tokens_and_patch_loss():
    torch.manual_seed(0)
    model, _ = build_model(TINY)
    batch, targets = _batch(model, b=2, n=3)
    lat, tok = model.predict_views(batch["context"], batch["actions"])
    p, d = model.encoder.num_patches, model.encoder.embed_dim
    assert tok.shape == (2, 3, p, d) and lat.shape == (2, 3, d)
    assert torch.allclose(lat, tok.mean(dim=2))
    with torch.no_grad():
        out = model(batch, targets, LOSS)
    want = ((tok - targets["view_tokens"]) ** 2).mean()
    assert out["patch_mse"].item() == pytest.approx(want.item(), rel=1e-5)
    adv = torch.nn.functional.softplus(-model.domain_classifier(tok.detach())).mean()
    assert out["domain"].item() == pytest.approx(want.item() + adv.item(), rel=1e-5)
    assert 0.0 <= out["fc_acc"].item() <= 1.0


def test_alignment_uses_centred_latents():
    torch.manual_seed(0)
    model, _ = build_model(TINY)
    batch, targets = _batch(model)
    with torch.no_grad():
        z = model.view_predictor(model.encoder(batch["context"]), batch["actions"]).mean(2).flatten(0, 1)
        t = targets["align"].flatten(0, 1)
        zc, tc = z - z.mean(0), t - t.mean(0)
        on = model(batch, targets, LOSS)
        off = model(batch, targets, dict(LOSS, center_latents=False))
    assert on["infonce"].item() == pytest.approx(L.info_nce(zc, tc, 0.1).item(), rel=1e-5)
    assert on["affinity"].item() == pytest.approx(
        L.affinity_loss(zc, tc, 0.1, 0.05, targets["groups"]).item(), rel=1e-5)
    assert off["infonce"].item() == pytest.approx(L.info_nce(z, t, 0.1).item(), rel=1e-5)
    assert on["top1"].item() == L.top1_accuracy(zc, tc).item()


def test_load_encoder_roundtrip(tmp_path):
    torch.manual_seed(0)
    model, target = build_model(TINY)
    ema_update(target, model.encoder, 0.5)  # make target differ from the initial copy
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01)
    ckpt = {"model_config": TINY, "model": model.state_dict(), "target_encoder": target.state_dict()}
    path = tmp_path / "ck.pt"
    torch.save(ckpt, path)
    x = torch.rand(2, 32, 32)
    enc = load_encoder(path)
    assert isinstance(enc, FrozenEncoder)
    assert torch.allclose(enc(x), target(x[:, None]).mean(1), atol=1e-6)
    assert enc(x).shape == (2, 192) and enc.tokens(x).shape == (2, 16, 192)
    enc.train()
    assert not enc.encoder.training and all(not p.requires_grad for p in enc.parameters())
    ctx = load_encoder(ckpt, which="context")
    assert torch.allclose(ctx(x[:, None]), model.encoder(x[:, None]).mean(1), atol=1e-6)
    # other sizes are resized to the encoder's input size
    assert enc(torch.rand(1, 1, 50, 40)).shape == (1, 192)
    with pytest.raises(ValueError):
        load_encoder({"model": {}})


def test_block_masks():
    g = torch.Generator().manual_seed(0)
    cfg = BlockMaskConfig(pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0), npred=2, min_keep=4)
    for _ in range(20):
        keep, pred = sample_block_masks(6, 8, cfg, g)
        assert keep.shape[0] == pred.shape[0] == 6
        assert keep.shape[1] >= 4 and pred.shape[1] >= 1
        for k, p in zip(keep, pred):
            assert not set(k.tolist()) & set(p.tolist())  # the encoder never sees a target patch
            assert k.max() < 64 and p.max() < 64
            assert torch.equal(k, k.sort().values)
    # target blocks are rectangles of about 15-20 % of the image (one block, no truncation needed)
    keep, pred = sample_block_masks(1, 16, BlockMaskConfig(), torch.Generator().manual_seed(3))
    r, c = pred[0] // 16, pred[0] % 16
    h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
    assert h * w == pred.shape[1] and 0.1 * 256 <= h * w <= 0.25 * 256
    # reproducible from the generator
    a = sample_block_masks(4, 8, cfg, torch.Generator().manual_seed(5))
    b = sample_block_masks(4, 8, cfg, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- renderer

def _box_ct(value=0.02):
    from xwin.io import Volume

    mu = torch.zeros(24, 24, 24)
    mu[6:18, 8:16, 4:20] = value
    mu[10:12, 14:16, 4:20] = 3 * value  # an off-centre "spine" so lateral views differ from frontal ones
    aff = np.diag([8.0, 8.0, 8.0, 1.0])
    aff[:3, 3] = -11.5 * 8.0
    return Volume(mu, aff)


def test_renderer_actions_and_images():
    from xwin.geometry import xwin_pose
    from xwin.intensity import normalize_radiograph
    from xwin.kernels import project
    from xwin.render import RenderConfig, Renderer

    cfg = RenderConfig.from_dict(dict(size=32, n_targets=4, yaw_step=15.0))
    r = Renderer(cfg)
    g = torch.Generator().manual_seed(0)
    a = r.sample_actions(3, g)
    assert a.shape == (3, 4, 3)
    yaw = a[..., 0]
    assert ((yaw >= -90) & (yaw <= 90)).all() and torch.all(torch.remainder(yaw, 15) == 0)
    assert all(len(set(row.tolist())) == 4 for row in yaw)  # distinct yaws per CT
    assert torch.all(a[..., 1:] == 0)
    ct = _box_ct()
    ctx, tgt = r.render([ct, _box_ct(0.03), _box_ct(0.01)], a)
    assert ctx.shape == (3, 1, 32, 32) and tgt.shape == (3, 4, 1, 32, 32)
    assert ctx.min() >= 0 and ctx.max() <= 1
    # the context is exactly the normalised frontal projection, the targets the projections after the actions
    geom = xwin_pose(0.0, size=32, isocenter=tuple(ct.center_world))
    ref = normalize_radiograph(project(ct.data, geom, affine=ct.affine))
    assert torch.allclose(ctx[0, 0], ref[0], atol=1e-6)
    geom = xwin_pose(a[0, 2, 0], a[0, 2, 1], a[0, 2, 2], size=32, isocenter=tuple(ct.center_world))
    ref = normalize_radiograph(project(ct.data, geom, affine=ct.affine))
    assert torch.allclose(tgt[0, 2, 0], ref[0], atol=1e-6)
    # continuous actions and pitch/roll
    cfg2 = RenderConfig.from_dict(dict(size=32, n_targets=5, yaw_step=None, pitch_range=[-10, 10], roll_range=[-5, 5]))
    a2 = Renderer(cfg2).sample_actions(2, g)
    assert (a2[..., 1].abs() <= 10).all() and (a2[..., 2].abs() <= 5).all() and a2[..., 1].abs().max() > 0
    assert torch.any(torch.remainder(a2[..., 0], 1.0) != 0)
    with pytest.raises(ValueError):
        RenderConfig.from_dict(dict(yaw_step=None, cache=True))


def test_render_cache_gives_identical_images():
    from xwin.render import RenderConfig, Renderer

    base = dict(size=24, n_targets=3, yaw_step=30.0)
    plain = Renderer(RenderConfig.from_dict(base))
    cached = Renderer(RenderConfig.from_dict({**base, "cache": True}))
    g = torch.Generator().manual_seed(1)
    cts = [_box_ct(), _box_ct(0.05)]
    for _ in range(3):
        a = plain.sample_actions(2, g)
        c1, t1 = plain.render(cts, a)
        c2, t2 = cached.render(cts, a, keys=[0, 1])
        assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(t1, t2, atol=1e-6)
    assert cached.views_rendered == 2 * 7  # every grid view (-90..90 step 30) of each CT, once
