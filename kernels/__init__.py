"""xwin.kernels: X-ray projection of volumes (Siddon, trilinear) and exact adjoints.

Triton kernels run for CUDA tensors; the torch reference runs everywhere else (and is what the kernels are
tested against). Both implement the same operators exactly.

    >>> from xwin.kernels import project, backproject
"""

from ._prep import ProjectorInputError
from .api import backproject, project, resolve_backend, triton_available

__all__ = ["project", "backproject", "ProjectorInputError", "triton_available", "resolve_backend"]
