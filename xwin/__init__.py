"""xwin: fast, exact, differentiable X-ray projection of CT volumes, the X-WIN world model and CT reconstruction."""

import os as _os

# Passive OpenMP waiting, set before torch is imported by any xwin module or CLI (``python -m xwin.*``
# imports this package first). On a shared or oversubscribed CPU, spinning OpenMP workers make torch's
# element-wise ops 10-300x slower. The user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import XwinError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["XwinError", "__version__"]
