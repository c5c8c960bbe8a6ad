"""Mycelium specialist classifiers: training, tracking and serving on a shared core."""

__version__ = "0.1.0"
