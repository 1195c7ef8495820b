"""X-WIN losses on hand-built inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from xwin import losses as L
from xwin.model import DomainClassifier


def _manual_info_nce(z, t, tau):
    z = F.normalize(z.double(), dim=1)
    t = F.normalize(t.double(), dim=1)
    m = z.shape[0]
    s = (z @ t.t()) / tau
    rows = sum(-(s[i, i] - torch.logsumexp(s[i], 0)) for i in range(m)) / m
    cols = sum(-(s[j, j] - torch.logsumexp(s[:, j], 0)) for j in range(m)) / m
    return 0.5 * (rows + cols)


def test_info_nce_known_values():
    m, tau = 4, 0.1
    eye = torch.eye(m, dtype=torch.float64)
    # perfect match, orthonormal targets: every row/column has logit 1/τ on the diagonal and 0 elsewhere
    assert L.info_nce(eye, eye, tau).item() == pytest.approx(math.log(1 + (m - 1) * math.exp(-10)), rel=1e-6)
    # each prediction points at the next target: the positive has logit 0, one negative has 1/τ
    shifted = eye.roll(1, dims=0)
    assert L.info_nce(shifted, eye, tau).item() == pytest.approx(math.log(math.exp(10) + m - 1), rel=1e-6)
    # all latents identical: uniform logits -> log M
    ones = torch.ones(m, 3, dtype=torch.float64)
    assert L.info_nce(ones, ones, tau).item() == pytest.approx(math.log(m), rel=1e-6)
    # scale invariance (cosine similarity) and agreement with the written-out formula
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ref = _manual_info_nce(z, t, 0.3).item()
    assert L.info_nce(z, t, 0.3).item() == pytest.approx(ref, rel=1e-5)
    assert L.info_nce(3 * z, 0.5 * t, 0.3).item() == pytest.approx(ref, rel=1e-5)


def test_top1_accuracy():
    t = torch.eye(5)
    assert L.top1_accuracy(t, t).item() == 1.0
    assert L.top1_accuracy(t.roll(1, dims=0), t).item() == 0.0
    z = t.clone()
    z[0] = t[3]
    assert L.top1_accuracy(z, t).item() == pytest.approx(0.8)


def test_affinity_equals_info_nce_for_orthogonal_targets():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 6, generator=g, dtype=torch.float64))
    t = q.t().float() * torch.rand(6, 1, generator=g) * 3 + 0.0  # orthogonal rows, arbitrary lengths
    z = torch.randn(6, 16, generator=g)
    for tau_aff in (0.02, 0.1, 1.0):
        a = L.affinity_loss(z, t, 0.1, tau_aff)
        assert a.item() == pytest.approx(L.info_nce(z, t, 0.1).item(), rel=1e-6)
        groups = torch.tensor([0, 0, 0, 1, 1, 1])
        assert L.affinity_loss(z, t, 0.1, tau_aff, groups).item() == pytest.approx(a.item(), rel=1e-6)
    eye = torch.eye(4)
    assert torch.equal(L.affinity_labels(eye, 0.05), eye)


def test_affinity_labels_soft_within_groups():
    # t0 and t1 share content (cos = 0.8), t2 is unrelated (orthogonal), t3 is anti-correlated with t0
    t = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    tau = 0.1
    a = L.affinity_labels(t, tau)
    w = 0.8 ** (1 / tau)
    assert a[0, 0].item() == pytest.approx(1 / (1 + w), rel=1e-5)
    assert a[0, 1].item() == pytest.approx(w / (1 + w), rel=1e-5)
    assert a[0, 2].item() == 0.0 and a[0, 3].item() == 0.0  # nothing shared -> exactly 0
    assert torch.allclose(a.sum(1), torch.ones(4))
    # groups: t0 and t1 in different CTs -> back to one-hot for them
    a2 = L.affinity_labels(t, tau, groups=torch.tensor([0, 1, 1, 0]))
    assert torch.equal(a2[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # one-hot InfoNCE pushes prediction 1 away from t0 (a projection of the same CT); the soft labels
    # push less: moving z1 from t1 towards t0 costs less under the affinity term
    def slope(loss_fn):
        eps = torch.zeros((), requires_grad=True)
        z = t.clone()
        z = torch.cat([z[:1], (t[1] + eps * (t[0] - t[1]))[None], z[2:]])
        loss_fn(z).backward()
        return eps.grad.item()

    d_nce = slope(lambda z: L.info_nce(z, t, 0.1))
    d_aff = slope(lambda z: L.affinity_loss(z, t, 0.1, tau))
    assert d_nce > 0 and d_aff < d_nce - 0.05
    # the labels carry no gradient into the targets; the logits do
    tt = t.clone().requires_grad_(True)
    L.affinity_labels(tt, tau).sum().backward() if L.affinity_labels(tt, tau).requires_grad else None
    assert tt.grad is None
    zz = torch.stack([t[0], t[0], t[2], t[3]]).requires_grad_(True)
    L.affinity_loss(zz, t, 0.1, tau).backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0


def test_alignment_loss_combines_terms():
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    groups = torch.arange(4).repeat_interleave(2)
    want = L.info_nce(z, t, 0.1) + 0.5 * L.affinity_loss(z, t, 0.1, 0.05, groups)
    got = L.alignment_loss(z, t, 0.1, lambda_affinity=0.5, affinity_temperature=0.05, groups=groups)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_mim_loss_value_and_target_detached():
    pred = torch.ones(2, 3, 4, requires_grad=True)
    target = torch.zeros(2, 3, 4, requires_grad=True)
    loss = L.mim_loss(pred, target)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert target.grad is None
    assert torch.allclose(pred.grad, torch.full_like(pred, 2.0 / pred.numel()))
    with pytest.raises(ValueError):
        L.mim_loss(pred, torch.zeros(2, 3, 5))


def _tokens(seed, n=64, d=16, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def test_domain_loss_value_and_gradient_isolation():
    torch.manual_seed(0)
    fc = DomainClassifier(16, hidden=32)
    pred = _tokens(1).requires_grad_(True)
    tgt = _tokens(2)
    loss = L.domain_loss(pred, tgt, fc)
    want = F.mse_loss(pred, tgt) + F.softplus(-fc(pred)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in fc.parameters()), "L_domain must not train the classifier"
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_classifier_loss_trains_only_the_classifier_and_separates_domains():
    torch.manual_seed(0)
    fc = DomainClassifier(16, hidden=32)
    real = _tokens(3, shift=1.0).requires_grad_(True)
    sim = _tokens(4, shift=-1.0).requires_grad_(True)
    loss0 = L.classifier_loss(fc, real, sim)
    assert math.isfinite(loss0.item())
    loss0.backward()
    assert real.grad is None and sim.grad is None, "L_cls must not move the tokens (the model)"
    assert all(p.grad is not None for p in fc.parameters())
    opt = torch.optim.SGD(fc.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        L.classifier_loss(fc, real, sim).backward()
        opt.step()
    assert L.classifier_loss(fc, real, sim).item() < 0.1
    with torch.no_grad():
        assert (fc(real) > 0).float().mean() > 0.95 and (fc(sim) < 0).float().mean() > 0.95


def test_domain_loss_moves_simulated_tokens_towards_real():
    """With a trained f_c, gradient steps on L_domain raise p(real) of the simulated tokens while the MSE
    anchor keeps them near their targets; f_c itself is unchanged."""
    torch.manual_seed(0)
    fc = DomainClassifier(16, hidden=32)
    real, sim = _tokens(3, shift=1.0), _tokens(4, shift=-1.0)
    opt = torch.optim.SGD(fc.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        L.classifier_loss(fc, real, sim).backward()
        opt.step()
    before = {k: v.clone() for k, v in fc.state_dict().items()}
    pred = sim.clone().requires_grad_(True)
    target = sim.clone()
    with torch.no_grad():
        p_real0 = torch.sigmoid(fc(pred)).mean().item()
        l0 = L.domain_loss(pred, target, fc).item()
    step = torch.optim.SGD([pred], lr=20.0)  # the loss is a mean over 64 tokens
    for _ in range(30):
        step.zero_grad()
        L.domain_loss(pred, target, fc).backward()
        step.step()
    with torch.no_grad():
        p_real1 = torch.sigmoid(fc(pred)).mean().item()
        l1 = L.domain_loss(pred, target, fc).item()
        drift = (pred - target).pow(2).mean().item()
    assert p_real0 < 0.1 and p_real1 > 0.5
    assert l1 < l0
    # structure kept: the tokens moved (about 1 per element, squared), but much less than the 2-unit gap
    # between the domains (squared distance 4 per element) that pure fooling could exploit
    assert 0.1 < drift < 2.0
    for k, v in fc.state_dict().items():
        assert torch.equal(v, before[k])
