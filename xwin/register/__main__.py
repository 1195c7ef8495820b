"""``python -m xwin.register``: see :mod:`xwin.register.cli`."""

import os
import sys

# spin-waiting OpenMP threads collapse torch on a shared machine: passive waiting, before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from xwin.register import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
