"""Tracking: MLflow runs, the tracking thread, publishing an epoch, the registry and champion, figures."""
