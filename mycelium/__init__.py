"""Mycelium specialist classifiers: training, tracking and serving on a shared core.

For services: ``mycelium.load("c6")`` returns the registered champion as a ``TaskModel`` whose
``predict(records)`` gives one ``Prediction(label, probabilities)`` per record (``mycelium.api``).
``import mycelium`` stays cheap: the API (and torch) load on first use.
"""

import os

__version__ = "0.1.0"

# MLflow's usage telemetry (on by default in MLflow 3) starts a thread at `import mlflow` that
# sets and unsets an environment variable; training reads os.environ on two threads (HTTP proxy
# lookups), and that race ended runs with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. Off unless the
# user says otherwise; it must be set before mlflow is imported, hence here.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_API = ("load", "Prediction", "TaskModel", "InvalidInputError", "ModelLoadError", "ModelNotFoundError")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from mycelium import api

        return getattr(api, name)
    raise AttributeError(f"module 'mycelium' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
