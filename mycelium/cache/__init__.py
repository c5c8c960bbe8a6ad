"""Frozen computation, run once: the no-grad backbone passes and their on-disk cache."""
