"""2D/3D registration: the rigid pose of a CT's imaging geometry from an X-ray (library and CLI).

    >>> from xwin.register import register
    >>> result = register(mu, target, init_geometry, affine=ct.affine)    # doctest: +SKIP
    >>> result.geometry, result.rotation, result.translation, result.losses

Command line: ``python -m xwin.register CT --xray TARGET --init INIT.json --out DIR`` (see ``--help``).
"""

from .core import RegistrationError, RegistrationResult, compose, default_levels, register
from .similarity import gradient_ncc, multiscale_ncc, ncc, patch_ncc

__all__ = ["register", "RegistrationResult", "RegistrationError", "compose", "default_levels", "ncc", "patch_ncc",
           "gradient_ncc", "multiscale_ncc", "main"]


def main(argv=None) -> int:
    """The ``python -m xwin.register`` command line (see :mod:`xwin.register.cli`)."""
    from .cli import main as _main

    return _main(argv)
