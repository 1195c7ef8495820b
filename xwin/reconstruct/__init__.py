"""CT reconstruction from projections: FDK / FBP, SIRT, CGLS and TV, and the ``python -m xwin.reconstruct`` tool.

    >>> from xwin.reconstruct import fdk, sirt, cgls, tv_recon
    >>> vol = fdk(projections, geometry, volume.shape, affine=affine)        # doctest: +SKIP

* :func:`fdk` / :func:`fbp` — filtered backprojection on a circular orbit (cone beam: FDK with cosine and
  Parker weights; parallel beam: FBP), voxel-driven backprojection kernel in Triton on CUDA
  (:mod:`xwin.kernels.fdk_backproject`). See :mod:`xwin.reconstruct.filters`.
* :func:`sirt`, :func:`cgls`, :func:`tv_recon` — iterative methods on ``xwin.kernels.project`` /
  ``backproject`` (any geometry). See :mod:`xwin.reconstruct.iterative`.
* :func:`main` — the command-line tool (also the ``xwin-reconstruct`` console script).

Submodules load lazily, so the command-line tool can configure the process before torch is imported.
"""

from __future__ import annotations

import importlib
import os

__all__ = ["fdk", "fbp", "sirt", "cgls", "tv_recon", "main"]

_LAZY = {"fdk": "filters", "fbp": "filters", "fov_mask": "filters", "sirt": "iterative", "cgls": "iterative",
         "tv_recon": "iterative"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


def main(argv=None) -> int:
    """Entry point of ``python -m xwin.reconstruct`` / ``xwin-reconstruct``; returns the exit status."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # before torch loads (see __main__.py)
    from . import __main__ as cli

    return cli.main(argv)
