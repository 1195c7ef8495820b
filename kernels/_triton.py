"""Launchers for the Triton projector kernels, with the same contract as ``kernels/reference.py``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .siddon import siddon_kernel
from .trilinear import trilinear_kernel

__all__ = ["forward", "adjoint", "BLOCK_R", "BLOCK_C", "NUM_WARPS"]

BLOCK_R, BLOCK_C = 8, 16          # 128 rays per program: a compact 2-D tile keeps neighbouring rays together
NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


def _dtype(vol_dtype):
    return (torch.float64, tl.float64) if vol_dtype == torch.float64 else (torch.float32, tl.float32)


def _launch(vol, params, proj, kind, rows, cols, method, dt_mm, shape, B, V, adjoint, tdt):
    X, Y, Z = shape
    int64 = max(B * X * Y * Z, B * V * rows * cols) > _INT32_MAX - 1
    grid = (triton.cdiv(rows, BLOCK_R) * triton.cdiv(cols, BLOCK_C), V, B)
    if V > 65535 or B > 65535:
        raise ValueError(f"at most 65535 views and 65535 volumes per launch, got V={V}, B={B}")
    common = dict(IS_CONE=kind == "cone", ADJOINT=adjoint, DTYPE=tdt, INT64=int64,
                  BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    if method == "siddon":
        siddon_kernel[grid](vol, params, proj, V, rows, cols, X, Y, Z, **common)
    else:
        trilinear_kernel[grid](vol, params, proj, dt_mm, V, rows, cols, X, Y, Z, **common)


def forward(volume, params, kind, rows, cols, method, dt_mm, out=None):
    """``out`` (optional, (B, V, rows, cols) in the compute dtype) is filled in place; tests pass a poisoned one."""
    B, X, Y, Z = volume.shape
    V = params.shape[1]
    cdt, tdt = _dtype(volume.dtype)
    dev = volume.device
    prm = params.to(device=dev, dtype=cdt).contiguous()
    dts = dt_mm.to(device=dev, dtype=cdt).contiguous()
    if out is None:
        out = torch.empty(B, V, rows, cols, device=dev, dtype=cdt)
    _launch(volume.contiguous(), prm, out, kind, rows, cols, method, dts, (X, Y, Z), B, V, False, tdt)
    return out


def adjoint(proj, params, kind, shape, method, dt_mm, out_dtype):
    B, V, rows, cols = proj.shape
    X, Y, Z = shape
    cdt, tdt = _dtype(out_dtype if out_dtype == torch.float64 else proj.dtype)
    dev = proj.device
    prm = params.to(device=dev, dtype=cdt).contiguous()
    dts = dt_mm.to(device=dev, dtype=cdt).contiguous()
    out = torch.zeros(B, X, Y, Z, device=dev, dtype=cdt)
    _launch(out, prm, proj.contiguous(), kind, rows, cols, method, dts, (X, Y, Z), B, V, True, tdt)
    return out.to(out_dtype)
