"""The retry budget and the diagnosis of tracking failures (tracking.outage), without servers:
the error words and the budget arithmetic. The outages themselves are in test_faults.py."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from mycelium.tracking.outage import TrackingOutage, resume_hint, with_retries


def test_a_transient_failure_is_retried_and_the_result_returned():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return 42

    assert with_retries("upload", flaky, budget_s=10, first_wait=0.05) == 42 and len(calls) == 3


def test_the_budget_bounds_the_tries_and_the_error_says_how_many(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    calls = []

    def down():
        calls.append(1)
        raise ConnectionError("connection refused")

    with pytest.raises(TrackingOutage) as info:
        with_retries("upload of the epoch 2 checkpoint", down, budget_s=0.5, first_wait=0.1)
    # waits 0.1, 0.2 fit in 0.5 s; the next (0.4) would not
    assert len(calls) == 3 and info.value.tries == 3
    assert "upload of the epoch 2 checkpoint failed: the object store behind the MLflow server is down" in str(info.value)
    hinted = resume_hint(info.value, "mycelium train --task c5 --resume true", "./state")
    assert str(hinted).endswith("The trained epochs are kept in ./state. When it is back, resume with: mycelium train --task c5 --resume true")


def test_refused_credentials_are_not_retried_and_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 401 != 200")

    with pytest.raises(TrackingOutage, match="credentials were refused"):
        with_retries("metrics", refused, budget_s=30, first_wait=1)
    assert len(calls) == 1
    bug = KeyError("epoch")
    assert resume_hint(bug, "cmd", "./state") is bug  # not a tracking failure: reported as it is
