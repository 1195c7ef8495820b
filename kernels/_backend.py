"""The one backend resolver of xwin.kernels: which implementation runs for data on a device."""

from __future__ import annotations

import os

import torch

from xwin.errors import XwinError

__all__ = ["BACKENDS", "triton_available", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device`` (CUDA, or any device under the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, error: type = XwinError) -> str:
    """``"auto"`` → ``"triton"`` for CUDA tensors, ``"torch"`` otherwise; ``"triton"`` is checked to be able to
    run on ``device``. ``error`` is the (XwinError) class raised for a bad name or an impossible choice."""
    if backend not in BACKENDS:
        raise error(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise error(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing triton); "
                    f"data is on {device}")
    return backend
