"""One error family for xwin: every user-facing error is an :class:`XwinError`.

The specific errors live next to the code that raises them (``ProjectorInputError`` in the kernels,
``GeometryError`` in :mod:`xwin.geometry`, ...) and all derive from :class:`XwinError`, which is itself a
``ValueError`` so that callers written against the older, plain ``ValueError`` contract keep working.
A command-line tool catches ``XwinError`` and prints its one-line message instead of a traceback.
"""

from __future__ import annotations

__all__ = ["XwinError"]


class XwinError(ValueError):
    """Base class of every bad-input / bad-file error xwin raises (a ``ValueError``)."""
