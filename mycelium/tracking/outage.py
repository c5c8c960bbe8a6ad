"""When MLflow or the artifact store fails: which one, retried for a bounded time, then one message.

A failure on the tracking thread is classified at once (a probe of the tracking server's
``/health``, of the S3 endpoint when this process knows it, and the error's HTTP status): the
tracking server is down, the object store behind it is down, or credentials are refused. Uploads
are retried with a doubling wait until a time budget (``-P retry_seconds``) is spent; then the
training ends with one message that names the component, where the trained epochs are kept, and
the command that resumes. MLflow's own HTTP retries (7 tries, minutes of backoff by default) are
shortened for the training process so that the budget is what bounds the wait.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from mycelium.tracking.runs import CREDENTIALS_REFUSED, TrackingError

log = logging.getLogger(__name__)

# MLflow's client retries each request itself; a few quick tries, then our budgeted retry decides.
MLFLOW_HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

_ARTIFACTS = re.compile(r"mlflow-artifacts|artifact", re.IGNORECASE)
_SERVER_ERROR = re.compile(r"\b50[0-4]\b|too many 5\d\d error responses")


def bound_mlflow_http_retries() -> None:
    """Shorten MLflow's per-request retries in this process (a user's own settings win)."""
    for name, value in MLFLOW_HTTP_RETRY_ENV.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class Diagnosis:
    component: str  # what is down or refusing, as a user would name it
    detail: str  # what the probe or the error showed
    heals: bool = True  # worth retrying: a server may come back, a refused credential will not

    def __str__(self) -> str:
        return f"{self.component} ({self.detail})"


class TrackingOutage(TrackingError):
    """Tracking stopped because a component is down; the message says which and how to resume."""

    def __init__(self, what: str, diagnosis: Diagnosis, tries: int, seconds: float, error: BaseException):
        self.what, self.diagnosis, self.tries, self.seconds, self.error = what, diagnosis, tries, seconds, error
        super().__init__(f"{what} failed: {diagnosis} — gave up after {tries} tr{'y' if tries == 1 else 'ies'} in {seconds:.0f} s "
                         f"(last error: {_short(error)})")


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _answers(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url`` answers HTTP 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except OSError as e:
        return str(getattr(e, "reason", e))


def _port_open(endpoint: str, timeout: float = 3.0) -> str | None:
    """None when something listens at the endpoint URL's host and port, else why not."""
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout):
            return None
    except OSError as e:
        return str(e)


def diagnose(error: BaseException) -> Diagnosis:
    """Which component a tracking failure comes from: probes first (they see the present), then the
    error's own words."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    text = str(error)
    if uri.startswith(("http://", "https://")):
        down = _answers(uri.rstrip("/") + "/health")
        if down is not None:
            return Diagnosis(f"the MLflow tracking server at {uri} is down", f"/health: {down}")
    if CREDENTIALS_REFUSED.search(text):
        return Diagnosis("credentials were refused",
                         "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and the AWS keys",
                         heals=False)
    s3 = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if s3:
        closed = _port_open(s3)
        if closed is not None:
            return Diagnosis("the object store behind the MLflow server is down", f"S3 endpoint {s3}: {closed}")
    if _SERVER_ERROR.search(text) and _ARTIFACTS.search(text):
        return Diagnosis(f"the artifact store behind the MLflow server at {uri} fails",
                         "the server answers but its artifact proxy returns server errors; check the object store it writes to")
    return Diagnosis("a tracking request failed", _short(error))


def with_retries(what: str, fn, budget_s: float = 60.0, first_wait: float = 1.0):
    """Run ``fn``; on failure diagnose at once, retry with a doubling wait while the time budget
    lasts, then raise ``TrackingOutage``. A refused credential is not retried (it will not heal)."""
    start = time.monotonic()
    wait, tries = first_wait, 0
    diagnosis = None
    while True:
        tries += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - network and server errors alike are retried
            diagnosis = diagnose(e) if diagnosis is None or tries % 3 == 0 else diagnosis
            elapsed = time.monotonic() - start
            if not diagnosis.heals or elapsed + wait > budget_s:
                raise TrackingOutage(what, diagnosis, tries, elapsed, e) from e
            log.warning("%s failed: %s; retrying in %.0f s (for up to %.0f s in all)", what, diagnosis, wait, budget_s)
            time.sleep(wait)
            wait *= 2


def is_tracking_failure(error: BaseException) -> bool:
    """An error of the servers or the network, not of this program's code."""
    import requests
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    return isinstance(error, (TrackingError, MlflowException, ConnectionError, TimeoutError, requests.RequestException,
                              BotoCoreError, ClientError))


class ResumableFailure(TrackingError):
    """A tracking failure worded for the user: what is down, where the epochs are kept, how to resume."""


def resume_hint(outage: BaseException, command: str, kept: str) -> BaseException:
    """A tracking failure from the tracking thread as one message that ends with how to resume;
    anything else (a bug, or a failure already worded so) unchanged."""
    if not is_tracking_failure(outage) or isinstance(outage, ResumableFailure):
        return outage
    if not isinstance(outage, TrackingOutage):
        outage = TrackingOutage("tracking", diagnose(outage), 1, 0.0, outage)
    error = ResumableFailure(f"{outage}. The trained epochs are kept in {kept}. When it is back, resume with: {command}")
    error.__cause__ = outage
    return error
