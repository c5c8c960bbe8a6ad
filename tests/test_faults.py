"""Faults against the real stack: the object store or the tracking server stops mid-training.

Each test owns a stack (its servers are stopped on purpose) and reads its data from local disk,
so that what fails is tracking, not data loading. The bounds on the time to fail are the
contract (``retry_seconds`` plus MLflow's shortened request retries), not a benchmark.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from mycelium import stack as stack_mod
from mycelium.data.demo import write_demo_corpus
from tests.conftest import start_stack

ROOT = Path(__file__).resolve().parents[1]
RETRY_SECONDS = 8


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults-data")
    write_demo_corpus(str(folder), files=2, per_file=120, seed=3, tasks=("c5",), progress=False)
    return folder


@pytest.fixture
def own_stack(tmp_path, monkeypatch):
    """A stack of this test's own, pointed at by this process (restored afterwards)."""
    cfg = start_stack(tmp_path / "stack")
    for k, v in stack_mod.stack_env(cfg).items():
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    try:
        yield cfg
    finally:
        stack_mod.down(cfg, log=lambda *_: None)


def _stop(cfg, service: str) -> None:
    os.killpg(stack_mod._read_pid(cfg, service), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while stack_mod._read_pid(cfg, service) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def _train_args(corpus: Path, model: str) -> list[str]:
    return ["--task", "c5", "--data", f"{corpus}/c5/", "--backbone", "minilm", "--epochs", "4", "--registered-model", model,
            "--experiment", model, "--fallbacks", "none", "--max-length", "64", "--retry-seconds", str(RETRY_SECONDS)]


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MYCELIUM_STATE": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mycelium.cli", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until(proc: subprocess.Popen, marker: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"never saw {marker!r}:\n" + "".join(seen[-40:]))


def _resume_command(output: str) -> list[str]:
    """The command the error message gives, as this interpreter runs it."""
    command = output.split("resume with: ", 1)[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[:2] == ["mycelium", "train"], command
    return words[2:]


def _check_clean_record(model: str) -> None:
    """One version per epoch, each metric step once, no pending logged model."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted(int(v.tags["epoch"]) for v in versions) == [1, 2, 3, 4]
    run_id = versions[0].tags["run_id"]
    for name in ("val_loss", "train_loss", "val_minority_f1"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2, 3, 4], name
    experiment = client.get_run(run_id).info.experiment_id
    statuses = [m.status for m in client.search_logged_models([experiment])]
    assert LoggedModelStatus.PENDING not in statuses, statuses


def test_store_down_after_epoch_1_names_it_in_seconds_and_resume_leaves_a_clean_record(own_stack, local_corpus, tmp_path):
    model = f"fault-store-{uuid.uuid4().hex[:8]}"
    proc = _start(_train_args(local_corpus, model), tmp_path)
    seen = _until(proc, " epoch 1: train_loss")  # logged once epoch 1 is registered
    _stop(own_stack, "seaweedfs")
    stopped = time.monotonic()
    rest, _ = proc.communicate(timeout=300)
    took = time.monotonic() - stopped
    output = "".join(seen) + rest
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    error = output[output.index("error:"):]
    assert "the object store behind the MLflow server is down" in error and "S3 endpoint" in error, error
    assert "trained epochs are kept in" in error and "resume with: mycelium train --task c5" in error
    # The retry budget, MLflow's shortened retries and the server's own S3 retries: well under a minute
    # beyond the budget (the stock client waited ~4 min per try, three times).
    assert took < RETRY_SECONDS + 90, took
    assert sorted(int(v.tags["epoch"]) for v in MlflowClient().search_model_versions(f"name = '{model}'")) == [1]
    # Nothing trained is lost: the unpublished epochs' checkpoints and the resume state stay on disk.
    kept = sorted(p.parent.parent.name for p in (tmp_path / "state" / "checkpoints").rglob("manifest.json"))
    assert kept and "epoch-001" not in kept, kept  # epoch 1 was uploaded, so its local copy is gone
    assert any((tmp_path / "state" / "resume").iterdir())

    # A kill during an upload leaves a pending logged model; a resume removes it.
    run_id = MlflowClient().search_model_versions(f"name = '{model}'")[0].tags["run_id"]
    run = MlflowClient().get_run(run_id)
    orphan = MlflowClient().create_logged_model(run.info.experiment_id, name="killed-upload", source_run_id=run_id)

    stack_mod.up(own_stack, log=lambda *_: None)  # the store is back (same data)
    resume = subprocess.run([sys.executable, "-m", "mycelium.cli", "train", *_resume_command(error)], cwd=tmp_path,
                            env={**os.environ, "MYCELIUM_STATE": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert "at epoch 2" in resume.stdout + resume.stderr
    _check_clean_record(model)
    with pytest.raises(Exception, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        MlflowClient().get_logged_model(orphan.model_id)


def test_store_down_from_the_start_fails_fast_without_a_traceback(own_stack, local_corpus, tmp_path):
    _stop(own_stack, "seaweedfs")
    started = time.monotonic()
    proc = _start(_train_args(local_corpus, f"fault-start-{uuid.uuid4().hex[:8]}"), tmp_path)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert "the object store behind the MLflow server is down" in output and "resume with: mycelium train" in output, output[-3000:]
    assert time.monotonic() - started < RETRY_SECONDS + 150  # model load and the backbone pass included


def test_tracking_server_down_mid_run_is_named(own_stack, local_corpus, tmp_path):
    proc = _start(_train_args(local_corpus, f"fault-mlflow-{uuid.uuid4().hex[:8]}"), tmp_path)
    seen = _until(proc, " epoch 1: train_loss")
    _stop(own_stack, "mlflow")
    stopped = time.monotonic()
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert f"the MLflow tracking server at {own_stack.tracking_uri} is down" in output, output[-3000:]
    assert "resume with: mycelium train --task c5" in output
    assert time.monotonic() - stopped < RETRY_SECONDS + 90


def test_resume_through_mlflow_run_marks_the_launcher_run_instead_of_leaving_an_empty_one(own_stack, tmp_path):
    model = f"fault-launcher-{uuid.uuid4().hex[:8]}"
    data = f"s3://mycelium-data/tests/{model}"  # MLproject's data parameter is a URI
    write_demo_corpus(data, files=2, per_file=120, seed=3, tasks=("c5",), progress=False)
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "c5", "--env-manager", "local", "--experiment-name", model,
           "-P", f"data={data}/c5/", "-P", "backbone=minilm", "-P", "epochs=4", "-P", f"registered_model={model}",
           "-P", "fallbacks=none", "-P", "max_length=64"]
    env = {**os.environ, "MYCELIUM_STATE": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _until(proc, " epoch 2: train_loss")
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training: kill -9 mid-run
    proc.wait(timeout=60)

    resumed = subprocess.run(cmd + ["-P", "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "resumed training run" in output and "pass --experiment-name" not in output, output[-3000:]
    _check_clean_record(model)

    client = MlflowClient()
    experiment = client.get_experiment_by_name(model).experiment_id
    top = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 2, [r.info.run_name for r in top]  # the training and the resume's launcher, nothing else
    (training,) = [r for r in top if r.data.tags.get("mycelium_role") == "parent"]
    (launcher,) = [r for r in top if r is not training]
    assert launcher.data.tags["mycelium_resume_of"] == training.info.run_id
    assert launcher.info.run_name == f"resume of {training.info.run_name}"
    assert training.data.tags["mycelium_state"] == "done" and training.data.tags["winner_version"]


def test_refused_tracking_credentials_are_named_before_training(stack, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "not-the-password", "MYCELIUM_STATE": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "mycelium.cli", "train", "--task", "c5", "--backbone", "minilm"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"the MLflow tracking server at {stack.tracking_uri} refused this process's credentials" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
