"""Runs on the MLflow tracking server: preflight, params without secrets, batched metrics and tags,
retries, and the runs a resumed training finds.

Layout of what a training leaves behind (the "tracking contract" of the design):

* experiment ``mycelium-cX`` (the registered model name by default), one parent run per training;
* one nested child run per attempt (the seed's recipe, then each fallback / collapse remedy), all
  with the same metric names, so the UI's compare view puts them side by side;
* per epoch, in the child run: ``train_loss``, ``val_loss``, ``val_*`` metrics (step = epoch),
  ``confusion/epoch-NNN.{png,json}``, and a pyfunc model registered as a new version of
  ``mycelium-cX`` with tags (epoch, run, attempt, metrics, collapsed, data fingerprint);
* alias ``champion`` on the best non-collapsed version, moved only when it beats the current
  champion on the same validation data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

log = logging.getLogger(__name__)


# Names that must never reach params, tags or artifacts, whatever a user passes: any name containing
# one of these, or ending in "token" (hf_token, MLFLOW_TRACKING_TOKEN; not token_budget).
_SECRET_HINTS = ("secret", "password", "passwd", "access_key", "api_key", "credential")


class TrackingError(RuntimeError):
    """The tracking server or artifact store is unusable; the message says what to check."""


# Words of an error from MLflow or S3 that refused this process's credentials.
CREDENTIALS_REFUSED = re.compile(
    r"\b(401|403)\b|Unauthorized|not authenticated|Forbidden|Permission|InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied")


def looks_secret(name: str) -> bool:
    """True for a parameter name that may hold a credential."""
    key = name.lower()
    return any(h in key for h in _SECRET_HINTS) or re.split(r"[^a-z0-9]+", key.strip("_-. "))[-1] in ("token", "tokens")


def scrub(params: dict[str, str]) -> dict[str, str]:
    """Drop anything that looks like a credential before it is logged."""
    return {k: v for k, v in params.items() if not looks_secret(k)}


def preflight(timeout: float = 10.0) -> str:
    """Fail before training when the tracking server does not answer; returns the tracking URI."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except Exception as e:  # noqa: BLE001 - any failure means the same advice
            raise TrackingError(
                f"the MLflow tracking server at {uri} does not answer ({e}). Start the embedded one with "
                "`mycelium stack up` and `eval \"$(mycelium stack env)\"`, or set MLFLOW_TRACKING_URI to your team's server."
            ) from None
        # /health answers anyone; one real request shows whether this process may use the server.
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient().search_experiments(max_results=1)
        except MlflowException as e:
            if CREDENTIALS_REFUSED.search(str(e)):
                raise TrackingError(
                    f"the MLflow tracking server at {uri} refused this process's credentials. Set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN); for the embedded stack run "
                    "`eval \"$(mycelium stack env)\"`."
                ) from None
            raise
    return uri


def log_params_once(params: dict[str, str], run_id: str) -> None:
    """Log params on a run, keeping what `mlflow run` already logged there.

    MLflow params are immutable. A launcher run from `mlflow run` already holds the MLproject
    parameters as typed (``''`` for an empty string); a resolved value that differs is logged
    as ``resolved_<name>`` beside it instead of failing the run.
    """
    from mlflow.entities import Param

    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    out = {}
    for k, v in params.items():
        old = existing.get(k)
        if old is None:
            out[k] = v
        elif old.strip("'\"") != v:
            out[f"resolved_{k}"] = v
    items = [Param(k, v) for k, v in out.items()]
    for i in range(0, len(items), 100):  # the REST API's limit per batch
        client.log_batch(run_id, params=items[i : i + 100])


def ui_url(run: mlflow.entities.Run | None = None) -> str:
    uri = mlflow.get_tracking_uri().rstrip("/")
    if run is None or not uri.startswith("http"):
        return uri
    return f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def log_batch(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str],
              model_id: str | None = None) -> None:
    """Metrics (at ``step``, linked to ``model_id`` when given) and run tags in one request."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def find_resumable(experiment: str, task: str, fingerprint: str) -> mlflow.entities.Run | None:
    """The newest parent run of this task and data that did not finish (killed, failed, or still marked running)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mycelium_role = 'parent' and tags.task = '{task}' and tags.data_fingerprint = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        if run.data.tags.get("mycelium_state") != "done":
            return run
    return None


def child_runs(parent_run_id: str, experiment_id: str) -> list[mlflow.entities.Run]:
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=100
    )
    return sorted(runs, key=lambda r: int(r.data.tags.get("attempt_index", "0")))


def log_png(client: MlflowClient, run_id: str, png: bytes, artifact_file: str) -> None:
    """Log PNG bytes (e.g. from ``figure_worker.png``) as ``artifact_file`` of the run."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path), folder or None)


def system_tags() -> dict[str, str]:
    """Provenance worth a tag, without anything secret from the environment."""
    return {
        "mycelium_version": __import__("mycelium").__version__,
        "host_gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }



# MLflow 3's UI opens an experiment of this kind on its training runs, not on the GenAI view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def use_experiment(name: str) -> str:
    """Make ``name`` the active experiment (created if missing), tagged as model development; its id."""
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def training_name(task: str, attempts: list[str], started_ms: int) -> str:
    """What a parent run is: ``c6 · unfreeze4-none-logit_adjusted → sqrt_inv · 12-01 21:04`` (local time)."""
    stamp = time.strftime("%m-%d %H:%M", time.localtime(started_ms / 1000))
    return f"{task} · {' → '.join(attempts)} · {stamp}"


class _SplitDataset(PandasDataset):
    """A split as an MLflow dataset whose profile also counts the records per class."""

    @property
    def profile(self) -> dict:
        counts = self._df[self.targets].value_counts().sort_index()
        return {**super().profile, "class_counts": {str(k): int(v) for k, v in counts.items()}}


def log_datasets(client: MlflowClient, run_id: str, name: str, source: str, fingerprint: str,
                 splits: dict[str, pd.DataFrame]) -> None:
    """Each split (context -> records with a ``label`` column) as an MLflow dataset input of the run:
    source = where the data was read, digest = the data fingerprint and the split, schema and profile."""
    inputs = []
    for context, frame in splits.items():
        digest = hashlib.sha256(f"{fingerprint}:{context}".encode()).hexdigest()[:32]  # MLflow keeps <= 36 chars
        dataset = _SplitDataset(frame, source=resolve_dataset_source(source), targets="label", name=f"{name}-{context}",
                                digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)
