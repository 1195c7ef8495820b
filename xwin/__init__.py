"""xwin: fast, exact, differentiable X-ray projection of CT volumes, the X-WIN world model and CT reconstruction."""

__version__ = "0.1.0"
