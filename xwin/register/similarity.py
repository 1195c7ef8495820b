"""Image similarities for 2D/3D registration that do not care about the target's intensity mapping.

A radiograph's grey values are an unknown, roughly monotone function of the line integrals a DRR holds
(exposure, detector response, post-processing, windowing). Normalised cross-correlation (NCC) is blind to
any affine map of either image; computed on local patches (``patch_ncc``) it only assumes that map to be
affine locally, and on image gradients (``gradient_ncc``) it compares edges, which is what survives a
non-linear mapping best. All return a similarity in [−1, 1] (1 = identical up to an affine map), averaged
over the batch; inputs are (H, W) or (B, H, W) / (B, 1, H, W).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ncc", "patch_ncc", "gradient_ncc", "multiscale_ncc", "SIMILARITIES", "similarity"]

_EPS = 1e-8


def _b1hw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]
    return x


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Global NCC of two images."""
    a, b = _b1hw(a).flatten(1), _b1hw(b).flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)).mean()


def patch_ncc(a: torch.Tensor, b: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean NCC over all ``patch`` × ``patch`` windows (box filters; stride 1)."""
    a, b = _b1hw(a), _b1hw(b)
    box = lambda x: F.avg_pool2d(x, patch, stride=1)
    ma, mb = box(a), box(b)
    va = (box(a * a) - ma * ma).clamp_min(0)
    vb = (box(b * b) - mb * mb).clamp_min(0)
    cov = box(a * b) - ma * mb
    return (cov / (va * vb + _EPS).sqrt()).mean()


def _sobel(x: torch.Tensor):
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    gx = F.conv2d(x, k[None, None])
    gy = F.conv2d(x, k.T[None, None])
    return gx, gy


def gradient_ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of the NCCs of the Sobel x- and y-derivatives (edges, sign-sensitive)."""
    (ax, ay), (bx, by) = _sobel(_b1hw(a)), _sobel(_b1hw(b))
    return 0.5 * (ncc(ax, bx) + ncc(ay, by))


def multiscale_ncc(a: torch.Tensor, b: torch.Tensor, patches: Sequence = (None, 9), weights=(0.5, 0.5)) -> torch.Tensor:
    """Weighted sum of the global NCC (``None``) and patch NCCs."""
    out = 0.0
    for p, w in zip(patches, weights):
        out = out + w * (ncc(a, b) if p is None else patch_ncc(a, b, int(p)))
    return out


def _mixed(a, b):
    """Half global NCC (the overall layout), half gradient NCC (the edges): the default."""
    return 0.5 * ncc(a, b) + 0.5 * gradient_ncc(a, b)


#: the similarities ``xwin.register`` accepts by name
SIMILARITIES = {"ncc": ncc, "gncc": gradient_ncc, "mncc": multiscale_ncc, "ncc+gncc": _mixed}


def similarity(name: str):
    from xwin.errors import XwinError

    if name not in SIMILARITIES:
        raise XwinError(f"similarity must be one of {sorted(SIMILARITIES)}, got {name!r}")
    return SIMILARITIES[name]
