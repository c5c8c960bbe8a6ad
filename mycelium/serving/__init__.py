"""Serving: checkpoints, the pyfunc package and its model code, and the predict command."""
