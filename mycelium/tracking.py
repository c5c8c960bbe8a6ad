"""Everything that talks to the MLflow tracking server and model registry.

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

import logging
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger("mycelium.tracking")

CHAMPION = "champion"
# Names that must never reach params, tags or artifacts, whatever a user passes: any name containing
# one of these, or ending in "token" (hf_token, MLFLOW_TRACKING_TOKEN; not token_budget).
_SECRET_HINTS = ("secret", "password", "passwd", "access_key", "api_key", "credential")


class TrackingError(RuntimeError):
    """The tracking server or artifact store is unusable; the message says what to check."""


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


class Lane:
    """MLflow work of a training on a background thread, in submission order.

    An epoch's upload and registration (a second or more of requests) then overlaps the next
    epoch's training instead of stalling it. After a job fails, later jobs do not run (an epoch is
    never published after an earlier one that was not, so the resume state stays at the last
    registered epoch). ``check`` raises a failed job's error at the next epoch; ``drain`` waits
    for every job and raises the first error; ``close`` waits too, so the epochs already trained
    are published even when training stops with an error.

    Jobs wait while the lane is ``paused()`` (and, with ``paused=True``, until the first pause
    ends): the backbone pass runs alone. Python work on a second thread holds the GIL between the
    pass's many short torch calls; on a 2-core CPU that made the MiniLM pass 2-4x slower.
    """

    def __init__(self, paused: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mycelium-tracking")
        self._futures: list = []
        self._failed: BaseException | None = None
        self._open = threading.Event()
        if not paused:
            self._open.set()

    def submit(self, fn, *args, **kwargs):
        def job():
            self._open.wait()
            if self._failed is not None:
                raise TrackingError(f"not run: an earlier tracking step failed ({self._failed})")
            try:
                return fn(*args, **kwargs)
            except BaseException as e:
                self._failed = e
                raise

        future = self._pool.submit(job)
        self._futures.append(future)
        return future

    @contextmanager
    def paused(self):
        """No job starts inside this block (a running one finishes)."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def check(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def drain(self, raise_errors: bool = True) -> None:
        self._open.set()
        for f in self._futures:
            error = f.exception()  # waits
            if error is not None:
                if raise_errors:
                    raise error
                log.warning("tracking thread: %s", error)

    def close(self) -> None:
        self._open.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def existing_version(model_name: str, run_id: str, epoch: int):
    """The version already registered for (run, epoch), so a resumed run never registers twice."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("epoch") == str(epoch):
            return v
    return None


def with_retries(what: str, fn, attempts: int = 3, wait: float = 2.0):
    """Run an upload; retry on failure, then raise with the last error."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - network and server errors alike are retried
            last = e
            log.warning("%s failed (try %d of %d): %s", what, i + 1, attempts, e)
            time.sleep(wait * (i + 1))
    raise TrackingError(f"{what} failed after {attempts} tries: {last}") from last


def log_png(client: MlflowClient, run_id: str, png: bytes, artifact_file: str) -> None:
    """Log PNG bytes (e.g. from ``figure_worker.png``) as ``artifact_file`` of the run."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path), folder or None)


def tag_version(model_name: str, version: str, tags: dict[str, object]) -> None:
    """Set tags on a model version. The registry API takes one tag per request; they go out in
    parallel instead of one after another."""
    from concurrent.futures import ThreadPoolExecutor

    client = MlflowClient()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda kv: client.set_model_version_tag(model_name, version, kv[0], str(kv[1])), tags.items()))


@dataclass
class Candidate:
    """The version a run would promote, with the numbers that decide."""

    version: str
    metric_name: str
    metric: float
    fingerprint: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    previous_version: str | None
    previous_metric: float | None

    def as_tags(self) -> dict[str, str]:
        return {
            "champion_decision": "promoted" if self.promoted else "kept",
            "champion_reason": self.reason,
            "champion_previous_version": str(self.previous_version),
            "champion_previous_metric": "" if self.previous_metric is None else f"{self.previous_metric:.6f}",
        }


def current_champion(model_name: str):
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def decide_promotion(model_name: str, candidate: Candidate | None, rescore_champion=None, min_metric: float = 0.0) -> Decision:
    """Move ``champion`` only to a better version on the same validation data, and never to one
    below ``min_metric`` (the quality gate; 0 = none).

    ``rescore_champion(version) -> float | None`` evaluates the current champion on this run's
    validation data when it was measured on other data (a different fingerprint); None means it
    could not be scored, and then the alias stays where it is.
    """
    if candidate is None:
        return Decision(False, "every epoch of every attempt collapsed: nothing to promote", None, None)
    champ = current_champion(model_name)
    if candidate.metric < min_metric:
        return Decision(False, f"{candidate.metric_name} {candidate.metric:.4f} is below min_metric {min_metric:g}: not promoted",
                        champ.version if champ else None, None)
    if champ is None:
        decision = Decision(True, "no champion yet", None, None)
    else:
        prev_metric: float | None
        if champ.tags.get("data_fingerprint") == candidate.fingerprint and candidate.metric_name in champ.tags:
            prev_metric = float(champ.tags[candidate.metric_name])
            where = "same data fingerprint"
        else:
            prev_metric = rescore_champion(champ) if rescore_champion else None
            where = "champion re-scored on this run's validation data"
        if prev_metric is None:
            return Decision(False, f"champion v{champ.version} could not be compared on this data; alias kept", champ.version, None)
        if candidate.metric > prev_metric:
            decision = Decision(
                True, f"{candidate.metric_name} {candidate.metric:.4f} > {prev_metric:.4f} of v{champ.version} ({where})",
                champ.version, prev_metric,
            )
        else:
            return Decision(
                False, f"{candidate.metric_name} {candidate.metric:.4f} <= {prev_metric:.4f} of v{champ.version} ({where})",
                champ.version, prev_metric,
            )
    MlflowClient().set_registered_model_alias(model_name, CHAMPION, candidate.version)
    return decision


def ensure_registered_model(name: str, description: str) -> None:
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created concurrently


def system_tags() -> dict[str, str]:
    """Provenance worth a tag, without anything secret from the environment."""
    return {
        "mycelium_version": __import__("mycelium").__version__,
        "host_gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
