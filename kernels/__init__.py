"""xwin.kernels: X-ray projection of volumes (Siddon, trilinear) and exact adjoints.

Triton kernels run for CUDA tensors; the torch reference runs everywhere else (and is what the kernels are
tested against). Both implement the same operators exactly.

    >>> from xwin.kernels import Projector, project, backproject
"""

from ._prep import ProjectorInputError
from .api import Projector, backproject, project, resolve_backend, triton_available

__all__ = ["Projector", "project", "backproject", "ProjectorInputError", "triton_available", "resolve_backend"]
