"""Data-parallel training: two gloo processes on this CPU against the real stack, compared with
one process on the same data and seed (same global batch).

With no dropout active (frozen backbone and ``dropout=0``; a tiny random Qwen2, whose blocks have
no dropout, for trainable blocks) the two runs do the same arithmetic up to summation order, so
their metrics agree to float rounding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mycelium.data.demo import write_demo_corpus
from mycelium.model.tiny import make_tiny_qwen2
from mycelium.tracking.registry import current_champion

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # float rounding between 1 and 2 processes (observed: below 1e-7)
METRICS = ("train_loss", "val_loss", "val_macro_f1", "val_minority_f1")


@pytest.fixture(scope="module")
def corpus(stack):
    prefix = f"s3://mycelium-data/tests/ddp-{uuid.uuid4().hex[:8]}"
    write_demo_corpus(prefix, files=4, per_file=150, seed=7, progress=False)
    return prefix


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", num_layers=3)


def _env(tmp_path: Path, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    # The venv's bin first: `mlflow run --env-manager local` starts `python` from PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PATH": path, "MYCELIUM_STATE": str(tmp_path / name), "PYTHONPATH": str(ROOT)}


def _train_args(task: str, data: str, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mycelium.cli", "train", "--task", task, "--data", data, "--registered-model", model,
            "--experiment", f"exp-{model}", "--fallbacks", "none", "--max-length", "64", "--dropout", "0", *extra]


def _picture(model: str) -> dict:
    """What a training leaves in MLflow: versions, parent and attempt runs, metric histories, champion decisions."""
    client = MlflowClient()
    versions = sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))
    exp = client.get_experiment_by_name(f"exp-{model}")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mycelium_role") == "parent"]
    attempts = [r for r in runs if r.data.tags.get("mycelium_role") == "attempt"]
    history = {m: [(p.step, p.value) for p in sorted(client.get_metric_history(attempts[0].info.run_id, m), key=lambda p: p.step)]
               for m in METRICS} if attempts else {}
    return {"versions": versions, "parents": parents, "attempts": attempts, "history": history,
            "promoted": [v.version for v in versions if v.tags.get("champion_decision") == "promoted"],
            "champion": current_champion(model)}


def _same_metrics(one: dict, two: dict) -> None:
    for m in METRICS:
        steps_one, steps_two = [s for s, _ in one["history"][m]], [s for s, _ in two["history"][m]]
        assert steps_one == steps_two, (m, steps_one, steps_two)  # one point per epoch: rank 1 logs nothing
        for (step, a), (_, b) in zip(one["history"][m], two["history"][m]):
            assert abs(a - b) <= TOLERANCE, f"{m} at epoch {step}: 1 process {a}, 2 processes {b}"


def _one_clean_training(p: dict, epochs: int) -> None:
    assert [v.tags["epoch"] for v in p["versions"]] == [str(e) for e in range(1, epochs + 1)]  # one version per epoch
    assert len(p["parents"]) == 1 and len(p["attempts"]) == 1
    assert p["parents"][0].data.params["world_size_resolved"] in ("1", "2")
    assert len(p["promoted"]) == 1 and p["champion"].version == p["promoted"][0]  # the alias moved once
    assert p["parents"][0].data.tags["winner_version"] == p["champion"].version


def test_c4_frozen_on_two_processes_matches_one_and_resumes_after_a_kill(stack, corpus, tmp_path):
    """C4, frozen backbone: 2 processes, killed (every rank) after epoch 2 and resumed with the
    printed parameters, leave the same picture and the same numbers as 1 uninterrupted process."""
    uid = uuid.uuid4().hex[:6]
    common = ("--backbone", "minilm", "--epochs", "4")
    one = f"ddp-c4-one-{uid}"
    proc = subprocess.run(_train_args("c4", f"{corpus}/c4/", one, *common), env=_env(tmp_path, "one"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = f"ddp-c4-two-{uid}"
    args = _train_args("c4", f"{corpus}/c4/", two, *common, "--nproc-per-node", "2")
    env = _env(tmp_path, "two")
    # Its own session: the kill takes the launcher and both ranks, as a lost machine would.
    run = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if " epoch 2: train_loss" in line:
            os.killpg(run.pid, signal.SIGKILL)
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, "".join(seen[-30:])

    resumed = subprocess.run(args + ["--resume", "true"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at epoch 3" in resumed.stdout + resumed.stderr

    p1, p2 = _picture(one), _picture(two)
    _one_clean_training(p1, 4)
    _one_clean_training(p2, 4)
    assert p2["parents"][0].data.params["world_size_resolved"] == "2"
    _same_metrics(p1, p2)
    assert p1["champion"].tags["epoch"] == p2["champion"].tags["epoch"]


def test_c6_trainable_blocks_through_mlflow_run_on_two_processes_match_one(stack, corpus, tiny_qwen2, tmp_path):
    """C6 with the last 2 blocks trainable (DDP over the prefix-cached suffix), launched by
    `mlflow run ... -P nproc_per_node=2`, against the same training in one process."""
    uid = uuid.uuid4().hex[:6]
    params = {"backbone": str(tiny_qwen2), "unfrozen_layers": "2", "lr_backbone": "1e-3", "epochs": "2", "fallbacks": "none",
              "max_length": "64", "dropout": "0", "data": f"{corpus}/c6/"}
    one = f"ddp-c6-one-{uid}"
    proc = subprocess.run(_train_args("c6", params["data"], one, "--backbone", params["backbone"], "--unfrozen-layers", "2",
                                      "--lr-backbone", "1e-3", "--epochs", "2"),
                          env=_env(tmp_path, "one"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = f"ddp-c6-two-{uid}"
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "c6", "--env-manager", "local", "--experiment-name", f"exp-{two}",
           "-P", "nproc_per_node=2", "-P", f"registered_model={two}", "-P", f"experiment=exp-{two}",
           *(a for k, v in params.items() for a in ("-P", f"{k}={v}"))]
    proc = subprocess.run(cmd, env=_env(tmp_path, "two"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "launching 2 processes" in proc.stderr
    p1, p2 = _picture(one), _picture(two)
    _one_clean_training(p1, 2)
    _one_clean_training(p2, 2)
    # `mlflow run`'s own run is the parent (its experiment is the training's): no other top-level run.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(f"exp-{two}").experiment_id])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [p2["parents"][0].info.run_id]
    assert p2["parents"][0].data.tags.get("mlflow.source.type") == "PROJECT"
    assert p2["attempts"][0].data.params["batches_from"] == "prefix"
    assert p2["attempts"][0].data.params["trainable_backbone_params"] != "0"
    _same_metrics(p1, p2)


def test_a_failure_on_rank_0_ends_every_rank_with_the_error_named(stack, tmp_path):
    """Rank 0 cannot read the data: the other rank (waiting for it) is ended too, with no hang and no traceback."""
    missing = f"s3://mycelium-data/tests/no-such-{uuid.uuid4().hex[:8]}/c4/"
    started = time.time()
    proc = subprocess.run(_train_args("c4", missing, f"ddp-fail-{uuid.uuid4().hex[:6]}", "--backbone", "minilm",
                                      "--nproc-per-node", "2", "--dist-timeout", "120"),
                          env=_env(tmp_path, "fail"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "error:" in out and missing.rstrip("/") in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert time.time() - started < 100  # ended by the launcher, well before the collective timeout
