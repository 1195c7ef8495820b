"""The X-WIN losses, one function each (all return a scalar tensor).

L = L_align + λ_MIM·L_MIM + λ_domain·L_domain + λ_cls·L_cls,   L_align = L_InfoNCE + λ_aff·L_affinity

Notation: ``z`` (M, D) predicted latents (view predictor output, mean-pooled over patches), ``t`` (M, D)
target latents (EMA encoder on the target projections, mean-pooled), row i of both belongs to the same
(CT, action) pair; all similarities are cosine similarities; τ is the contrastive temperature (0.1).

The affinity term — our choice, since the paper gives no closed form
--------------------------------------------------------------------
Projections of one CT share anatomy, so the one-hot InfoNCE label that pushes z_i away from t_j (j ≠ i,
same CT) is too strict. X-WIN softens it with the targets' mutual similarities. We use

    s_ij = cos(t_i, t_j)                          (targets detached: labels carry no gradient)
    A_ij = max(s_ij, 0)^(1/τ̃) / Σ_k max(s_ik, 0)^(1/τ̃)     over j with group(j) = group(i)
         = softmax_j( log max(s_ij, 0) / τ̃ )
    L_affinity = ½·[ CE_soft(logits, A) + CE_soft(logitsᵀ, A) ],  logits_ij = cos(z_i, t_j)/τ

i.e. the symmetric InfoNCE with soft labels A in place of the identity. It is the paper's
"softmax_j(sim(t_i, t_j)/τ̃)" with the similarity taken in log space, log max(s, 0), for two reasons:
(1) targets that share nothing (s_ij ≤ 0) get label exactly 0, so for mutually orthogonal targets A = I
and L_affinity equals L_InfoNCE exactly (with the plain softmax the diagonal would only approach 1 as
τ̃ → 0); (2) the diagonal always carries the largest weight (s_ii = 1). ``groups`` (the CT index of each
row) optionally restricts the soft positives to projections of the same volume — the paper's motivation;
rows of other CTs keep label 0 and stay negatives. The training loop passes the groups.

Domain adaptation (structure-preserving)
----------------------------------------
As in the paper, f_c is a token-wise classifier on the *view predictor's* predicted patch tokens z_patch of
the simulated target views; the real side is the EMA encoder's tokens of real radiographs (the space the
predicted tokens are regressed into). L_cls trains f_c to tell real (label 1) from predicted simulated
(label 0) on *detached* tokens, so L_cls moves only f_c. L_domain moves only the model: the patch MSE of
z_patch against the EMA encoder's tokens t_patch of the target views (keeps their structure) minus
log p_fc(real | z_patch) evaluated with f_c's parameters detached (the non-saturating adversarial term).
The MSE is averaged over channels (the paper's ‖z − t‖² sums them: the same loss with λ scaled by 1/D).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "info_nce",
    "affinity_labels",
    "affinity_loss",
    "alignment_loss",
    "top1_accuracy",
    "mim_loss",
    "domain_loss",
    "classifier_loss",
    "classifier_accuracy",
]


def _logits(z: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    if z.dim() != 2 or z.shape != t.shape:
        raise ValueError(f"z and t must both be (M, D), got {tuple(z.shape)} and {tuple(t.shape)}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    dt = torch.float64 if torch.float64 in (z.dtype, t.dtype) else torch.float32  # bf16/fp16 -> fp32
    z = F.normalize(z.to(dt), dim=1)
    t = F.normalize(t.to(dt), dim=1)
    return z @ t.t() / temperature


def info_nce(z: torch.Tensor, t: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: ½[CE(logits, I) + CE(logitsᵀ, I)] with logits_ij = cos(z_i, t_j)/τ."""
    logits = _logits(z, t, temperature)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def affinity_labels(t: torch.Tensor, affinity_temperature: float = 0.05,
                    groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft labels A (M, M), rows summing to 1: A_ij ∝ max(cos(t_i, t_j), 0)^(1/τ̃) within a group."""
    if affinity_temperature <= 0:
        raise ValueError("affinity_temperature must be positive")
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    tn = F.normalize(t.detach().to(dt), dim=1)
    s = (tn @ tn.t()).clamp(max=1.0)
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    s = s.masked_fill(eye, 1.0)  # a target is always its own positive, even for a zero vector
    logw = torch.log(s.clamp(min=0.0)) / affinity_temperature  # -inf where s <= 0
    if groups is not None:
        groups = groups.reshape(-1).to(s.device)
        if groups.shape[0] != s.shape[0]:
            raise ValueError(f"groups has {groups.shape[0]} entries for {s.shape[0]} targets")
        logw = logw.masked_fill(groups[:, None] != groups[None, :], float("-inf"))
    return torch.softmax(logw, dim=1)


def affinity_loss(z: torch.Tensor, t: torch.Tensor, temperature: float = 0.1,
                  affinity_temperature: float = 0.05, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft-label symmetric InfoNCE with the affinity labels of :func:`affinity_labels` (module docstring)."""
    logits = _logits(z, t, temperature)
    a = affinity_labels(t, affinity_temperature, groups)
    return 0.5 * (F.cross_entropy(logits, a) + F.cross_entropy(logits.t(), a))


def alignment_loss(z: torch.Tensor, t: torch.Tensor, temperature: float = 0.1, lambda_affinity: float = 1.0,
                   affinity_temperature: float = 0.05, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_align = L_InfoNCE + λ_aff·L_affinity."""
    return info_nce(z, t, temperature) + lambda_affinity * affinity_loss(
        z, t, temperature, affinity_temperature, groups)


@torch.no_grad()
def top1_accuracy(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Fraction of rows i whose most similar target (cosine, among all M targets) is t_i. Chance is 1/M."""
    logits = _logits(z, t, 1.0)
    return (logits.argmax(dim=1) == torch.arange(logits.shape[0], device=logits.device)).float().mean()


def mim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Masked-image-modelling regression: mean squared error between the mask predictor's tokens and the
    (layer-normed, detached) EMA encoder tokens at the hidden positions."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred.float(), target.detach().float())


def domain_loss(pred_sim: torch.Tensor, target_sim: torch.Tensor, classifier) -> torch.Tensor:
    """L_domain = MSE(pred_sim, target_sim) − mean log p_fc(real | pred_sim).

    ``classifier(tokens, frozen=True)`` must return real-vs-simulated logits computed with detached
    parameters (``xwin.model.DomainClassifier`` does), so this loss sends gradient into the predicted
    tokens — the model — and none into f_c. −log σ(logit) is computed stably as softplus(−logit).
    """
    logit = classifier(pred_sim, frozen=True)
    return mim_loss(pred_sim, target_sim) + F.softplus(-logit.float()).mean()


def classifier_loss(classifier, real_tokens: torch.Tensor, sim_tokens: torch.Tensor) -> torch.Tensor:
    """L_cls: binary cross entropy of f_c, real tokens → 1, simulated tokens → 0 (mean of the two halves).
    The tokens are detached here, so L_cls trains only the classifier."""
    lr = classifier(real_tokens.detach()).float()
    ls = classifier(sim_tokens.detach()).float()
    return 0.5 * (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
                  + F.binary_cross_entropy_with_logits(ls, torch.zeros_like(ls)))


@torch.no_grad()
def classifier_accuracy(classifier, real_tokens: torch.Tensor, sim_tokens: torch.Tensor) -> torch.Tensor:
    """Balanced token accuracy of f_c: ½[P(logit > 0 | real) + P(logit <= 0 | simulated)]. Chance 0.5."""
    return 0.5 * ((classifier(real_tokens) > 0).float().mean() + (classifier(sim_tokens) <= 0).float().mean())
