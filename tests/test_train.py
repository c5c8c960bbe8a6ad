"""The training core end to end, against the real stack: `mlflow run`, registry, champion, collapse, fallbacks, resume.

Small demo data and the packaged MiniLM backbone keep each run to seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mycelium import storage
from mycelium.config import config_from_args
from mycelium.data.demo import write_demo_corpus
from mycelium.tracking.registry import (
    Candidate,
    current_champion,
    decide_promotion,
    tag_version,
)
from mycelium.tracking.runs import child_runs
from mycelium.train.run import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(stack):
    """A small demo corpus for all three tasks in the stack's S3."""
    prefix = f"s3://mycelium-data/tests/train-{uuid.uuid4().hex[:8]}"
    write_demo_corpus(prefix, files=6, per_file=250, seed=7, progress=False)
    return prefix


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _versions(name: str):
    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _env(tmp_path):
    # In-process runs of other tests leave MLflow's active-experiment variables behind.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    return {**env, "MYCELIUM_STATE": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}


def test_mlflow_run_c4_registers_every_epoch_and_promotes_the_best(stack, corpus, tmp_path):
    model = f"test-c4-{_uid()}"
    experiment = f"exp-c4-{_uid()}"
    cmd = [
        sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "c4", "--env-manager", "local",
        "--experiment-name", experiment,
        "-P", f"data={corpus}/c4/", "-P", "backbone=minilm", "-P", "epochs=3", "-P", f"registered_model={model}",
        "-P", "fallbacks=none", "-P", "max_length=64",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    versions = _versions(model)
    assert [v.tags["epoch"] for v in versions] == ["1", "2", "3"]
    champion = MlflowClient().get_model_version_by_alias(model, "champion")
    healthy = [v for v in versions if v.tags["collapsed"] == "false"]
    best = max(healthy, key=lambda v: (float(v.tags["minority_f1"]), -int(v.tags["epoch"])))
    assert champion.version == best.version

    # The launcher run (from `mlflow run`) is the parent: it lives in the task's experiment.
    client = MlflowClient()
    child = client.get_run(versions[0].tags["run_id"])
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["winner_version"] == champion.version
    assert parent.data.params["precision_resolved"] == "fp32"
    # CPU auto budgets: whole training batches (32 x 128 tokens), the faster 2048 for the backbone pass.
    assert (parent.data.params["token_budget_resolved"], parent.data.params["pass_token_budget_resolved"]) == ("4096", "2048")
    assert float(parent.data.metrics["train_count_BRIDGING"]) > 0
    history = client.get_metric_history(child.info.run_id, "val_minority_f1")
    assert [m.step for m in history] == [1, 2, 3]
    for name in ("val_f1_BRIDGING", "val_recall_NOT_BRIDGING", "val_pred_share_BRIDGING", "val_collapsed", "train_loss", "val_loss"):
        assert len(client.get_metric_history(child.info.run_id, name)) == 3, name
    # The weights the run used are logged per class: BRIDGING up-weighted.
    assert float(child.data.params["weight_BRIDGING"]) > 10 * float(child.data.params["weight_NOT_BRIDGING"])

    # The confusion matrices are objects in S3, under the artifact store's prefix.
    keys = [o.key for o in storage.list_objects("s3://mycelium-data/models/") if child.info.run_id in o.key]
    assert any(k.endswith("confusion/epoch-003.json") for k in keys)
    assert any(k.endswith("confusion/epoch-001.png") for k in keys)
    cm_key = next(k for k in keys if k.endswith("confusion/epoch-002.json"))
    cm = json.loads(storage.read_bytes(f"s3://mycelium-data/models/{cm_key}"))
    assert cm["labels"] == ["NOT_BRIDGING", "BRIDGING"]
    assert sum(map(sum, cm["matrix"])) == int(parent.data.params["n_val"])
    # The figures (drawn in the helper process) are PNG files: per epoch, and on the parent run.
    png = b"\x89PNG\r\n\x1a\n"
    assert storage.read_bytes(f"s3://mycelium-data/models/{cm_key[:-len('002.json')]}001.png")[:8] == png
    parent_keys = [o.key for o in storage.list_objects("s3://mycelium-data/models/") if parent.info.run_id in o.key]
    for name in ("data/class_distribution.png", "attempts_comparison.png"):
        key = next(k for k in parent_keys if k.endswith(name))
        assert storage.read_bytes(f"s3://mycelium-data/models/{key}")[:8] == png, name
    # What the UI reads: a training experiment, a parent named for what it is (not MLflow's random
    # name from `mlflow run`), the winner's headline metrics, and the data as MLflow datasets.
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert re.fullmatch(r"c4 · frozen-balanced-ce · \d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    assert parent.data.metrics["collapsed"] == 0.0
    assert parent.data.metrics["best_minority_f1"] == pytest.approx(float(champion.tags["minority_f1"]), abs=1e-6)
    inputs = {i.tags[0].value: i.dataset for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for context, n in (("training", "n_train"), ("validation", "n_val")):
        ds = inputs[context]
        assert ds.name == f"c4-{context}" and ds.source_type == "s3"
        assert json.loads(ds.source)["uri"].rstrip("/") == f"{corpus}/c4"
        profile = json.loads(ds.profile)
        assert profile["num_rows"] == sum(profile["class_counts"].values()) == int(parent.data.params[n])
        assert profile["class_counts"]["BRIDGING"] > 0
        assert {c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]} == {"step_i", "step_j", "label"}
    assert inputs["training"].digest != inputs["validation"].digest

    # Secrets never reach params or tags.
    hidden = (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    assert all(secret not in str(v) for secret in hidden for v in {**parent.data.params, **parent.data.tags}.values())


def test_unweighted_c4_collapses_and_is_not_promoted(stack, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MYCELIUM_STATE", str(tmp_path / "state"))
    model = f"test-c4-collapse-{_uid()}"
    cfg = config_from_args(
        ["--data", f"{corpus}/c4/", "--backbone", "minilm", "--epochs", "1", "--class-weights", "none",
         "--lr-head", "3e-4", "--registered-model", model, "--experiment", f"exp-{_uid()}", "--fallbacks", "none",
         "--max-length", "64", "--threshold", "none"],
        "c4",
    )
    result = run(cfg)
    assert all(e.report.collapsed for e in result.attempts[0].epochs)
    assert all(e.report.metrics["recall_BRIDGING"] == 0.0 for e in result.attempts[0].epochs)
    assert result.winner is None and not result.decision.promoted
    assert current_champion(model) is None
    assert {v.tags["collapsed"] for v in _versions(model)} == {"true"}
    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.data.tags["champion_decision"] == "kept"
    assert parent.data.tags["winner_attempt"].startswith("none")
    assert parent.data.metrics["collapsed"] == 1.0  # the runs table shows the collapse without expanding the run


def test_forced_c6_ladder_creates_child_runs_in_order(stack, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MYCELIUM_STATE", str(tmp_path / "state"))
    model = f"test-c6-{_uid()}"
    cfg = config_from_args(
        ["--data", f"{corpus}/c6/", "--backbone", "minilm", "--epochs", "1", "--registered-model", model,
         "--experiment", f"exp-{_uid()}", "--force-fallbacks", "true", "--max-length", "64"],
        "c6",
    )
    result = run(cfg)
    names = [f"{r.attempt.index}-{r.attempt.name}" for r in result.attempts]
    assert names == ["1-unfreeze4-none-logit_adjusted", "2-sqrt_inv", "3-focal2"]
    client = MlflowClient()
    children = child_runs(result.parent_run_id, client.get_run(result.parent_run_id).info.experiment_id)
    assert [c.info.run_name for c in children] == names
    assert [c.data.tags["changed"] for c in children][1:] == ["sqrt(inverse frequency) class weights", "focal loss (gamma 2)"]
    assert children[1].data.params["class_weights"] == "sqrt_inv" and children[2].data.params["loss"] == "focal"
    parent = client.get_run(result.parent_run_id)
    scores = {f"{r.attempt.index}-{r.attempt.name}": (r.best("macro_f1").report.metrics["macro_f1"] if r.best("macro_f1") else -1)
              for r in result.attempts}
    assert parent.data.tags["winner_attempt"] == max(scores, key=scores.get)
    assert parent.info.run_name.startswith("c6 · unfreeze4-none-logit_adjusted → sqrt_inv → focal2 · ")
    assert len(_versions(model)) == 3
    # Every child logs the same metric names, so the UI compares them side by side.
    keys = [set(k for k in c.data.metrics) for c in children]
    assert keys[0] == keys[1] == keys[2]


def test_champion_moves_only_on_a_better_version_on_the_same_data(stack, tmp_path):
    client = MlflowClient()
    name = f"test-gate-{_uid()}"
    client.create_registered_model(name)
    exp = client.create_experiment(f"gate-{_uid()}")
    run_id = client.create_run(exp).info.run_id

    def version(metric: float, fingerprint: str = "fp1") -> Candidate:
        v = client.create_model_version(name, f"runs:/{run_id}/m", run_id=run_id)
        tag_version(name, v.version, {"data_fingerprint": fingerprint, "macro_f1": f"{metric:.6f}"})
        return Candidate(v.version, "macro_f1", metric, fingerprint)

    first = version(0.70)
    assert decide_promotion(name, first).promoted  # no champion yet
    worse = version(0.60)
    d = decide_promotion(name, worse)
    assert not d.promoted and d.previous_metric == pytest.approx(0.70)
    assert current_champion(name).version == first.version
    better = version(0.80)
    assert decide_promotion(name, better).promoted
    assert current_champion(name).version == better.version
    # Other data: the champion is re-scored on this run's data; unscoreable keeps the alias.
    other = version(0.99, fingerprint="fp2")
    assert not decide_promotion(name, other, rescore_champion=lambda v: None).promoted
    assert not decide_promotion(name, other, rescore_champion=lambda v: 0.995).promoted
    assert decide_promotion(name, other, rescore_champion=lambda v: 0.5).promoted
    assert current_champion(name).version == other.version
    # A run whose every epoch collapsed promotes nothing.
    assert not decide_promotion(name, None).promoted


def test_killed_run_resumes_at_the_next_epoch(stack, corpus, tmp_path):
    model = f"test-resume-{_uid()}"
    experiment = f"exp-resume-{_uid()}"
    args = [sys.executable, "-m", "mycelium.cli", "train", "--task", "c5", "--data", f"{corpus}/c5/", "--backbone", "minilm",
            "--epochs", "4", "--registered-model", model, "--experiment", experiment, "--fallbacks", "none", "--max-length", "64"]
    env = _env(tmp_path)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if " epoch 2: train_loss" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert sorted(v.tags["epoch"] for v in _versions(model)) == ["1", "2"]

    out = subprocess.run(args + ["--resume", "true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "at epoch 3" in out.stderr + out.stdout
    versions = _versions(model)
    assert sorted(v.tags["epoch"] for v in versions) == ["1", "2", "3", "4"]
    assert len({v.tags["run_id"] for v in versions}) == 1  # the same child run continued
    history = MlflowClient().get_metric_history(versions[0].tags["run_id"], "val_minority_f1")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert current_champion(model) is not None
