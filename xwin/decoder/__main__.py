"""``python -m xwin.decoder RUN``: the decoder stage (see :func:`xwin.decoder.training.main`)."""

import sys

from .training import main

sys.exit(main())
