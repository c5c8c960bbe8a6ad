"""The recipe features chosen by the quality benchmark: input composition with context-first
truncation, the tuned decision threshold (stored, applied by pyfunc, the CLI and the API), the
minimum-quality gate, early stopping, the new losses and weights, and the collapse rule for a
minority class never predicted right. Unit parts run offline; the run goes through the real stack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from mycelium.config import ConfigError, config_from_args
from mycelium.data.demo import write_demo_corpus
from mycelium.metrics import evaluate_predictions
from mycelium.model.backbone import load_backbone
from mycelium.serving.package import output_frame
from mycelium.text import encode_rows
from mycelium.train import threshold as decision
from mycelium.train.losses import class_weights, make_loss
from mycelium.train.run import run

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ offline units


def test_threshold_is_tuned_for_minority_f1_and_applied_alike():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.05, 0.10, 0.20, 0.35, 0.30, 0.40])  # argmax finds no positive; a cut near 0.3 finds both
    t = decision.tune(y, p)
    assert 0.20 < t <= 0.30
    probs = np.stack([1 - p, p], axis=1)
    rule = decision.resolve("auto", ["NOT_BRIDGING", "BRIDGING"], "BRIDGING", y, probs)
    assert rule == {"label": "BRIDGING", "value": t}
    labels = decision.predict(probs, ["NOT_BRIDGING", "BRIDGING"], rule)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert probs.argmax(1).tolist() == [0, 0, 0, 0, 0, 0]
    # Serving's frame and the argmax fallback.
    frame = output_frame(probs, ["NOT_BRIDGING", "BRIDGING"], rule)
    assert frame["label"].tolist() == ["NOT_BRIDGING"] * 3 + ["BRIDGING"] * 3
    assert np.allclose(frame["prob_BRIDGING"], p)
    assert output_frame(probs, ["NOT_BRIDGING", "BRIDGING"])["label"].tolist() == ["NOT_BRIDGING"] * 6
    assert decision.resolve("none", ["A", "B"], "B", y, probs) is None
    assert decision.resolve("0.25", ["A", "B"], "B", y, probs) == {"label": "B", "value": 0.25}
    assert decision.resolve("auto", ["A", "B", "C"], None, y, np.ones((6, 3)) / 3) is None


def test_truncation_cuts_the_problem_and_keeps_the_steps_whole():
    _, tok, _ = load_backbone("minilm")
    problem = " ".join(f"word{i}" for i in range(200))
    step_i, step_j = "48/2 = <<48/2=24>>24 clips in May", "48+24 = <<48+24=72>>72 clips altogether"
    fields = ("problem", "step_i", "step_j")
    [ids] = encode_rows(tok, [(problem, step_i, step_j)], fields, " [SEP] ", 64, context_fields=("problem",))
    assert len(ids) <= 64
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith(tok.decode(tok(step_j, add_special_tokens=False)["input_ids"]))
    assert tok.decode(tok(step_i, add_special_tokens=False)["input_ids"]) in text
    assert "word0" in text and "word199" not in text
    # Without context fields it is plain truncation: the last step is cut.
    [plain] = encode_rows(tok, [(problem, step_i, step_j)], fields, " [SEP] ", 64)
    assert "72 clips altogether" not in tok.decode(plain, skip_special_tokens=True)
    # Rows under the limit are untouched.
    [short] = encode_rows(tok, [("A problem.", step_i, step_j)], fields, " [SEP] ", 64, context_fields=("problem",))
    assert short == tok("A problem. [SEP] " + step_i + " [SEP] " + step_j)["input_ids"]


def test_number_symbols_follow_values_across_the_fields_of_a_record():
    from mycelium.text import join_inputs, number_symbols

    problem = "Carl has 1,200 stamps and buys 3 more packs of 20; he had 2 albums."
    step_i = "3 * 20 = 60 stamps."
    step_j = "1200 + 60 = 1260 stamps in 2.0 albums (H2O, x2)."
    assert number_symbols([problem, step_i, step_j]) == [
        "Carl has N1 stamps and buys N2 more packs of N3; he had N4 albums.",
        "N2 * N3 = N5 stamps.",
        "N1 + N5 = N6 stamps in N4 albums (H2O, x2).",  # 1,200 = 1200 and 2 = 2.0; numbers inside words stay
    ]
    # Symbols are per record, and mapping twice changes nothing (serving may see mapped text).
    assert number_symbols(["7 apples"]) == ["N1 apples"]
    mapped = number_symbols([step_i, step_j])
    assert number_symbols(mapped) == mapped
    assert join_inputs([step_i, step_j], " [SEP] ") == f"{step_i} [SEP] {step_j}"


def test_inputs_parameter_is_validated_and_becomes_the_spec():
    cfg = config_from_args(["--inputs", "problem,step_i,step_j"], "c4")
    assert cfg.spec.input_fields == ("problem", "step_i", "step_j")
    assert set(cfg.spec.allow_empty) == {"problem", "step_i"}
    # earlier_steps is context ("" before the first step), allowed empty only when it is read.
    assert config_from_args(["--inputs", "problem,earlier_steps,step_j"], "c4").spec.allow_empty == ("problem", "earlier_steps")
    assert config_from_args([], "c4").spec.allow_empty == ("step_i",)
    # With no -P inputs, C4 reads the seed's composition (no context beat it on the quality bench).
    assert config_from_args([], "c4").spec.input_fields == ("step_i", "step_j")
    assert config_from_args([], "c6").spec.input_fields == ("problem",)
    with pytest.raises(ConfigError, match="inputs"):
        config_from_args(["--inputs", "problem,question"], "c4")
    with pytest.raises(ConfigError, match="threshold"):
        config_from_args(["--threshold", "0.3"], "c6")
    with pytest.raises(ConfigError, match="min_metric"):
        config_from_args(["--min-metric", "2"], "c4")


def test_minority_never_predicted_right_is_collapsed():
    # The seed's C4 failure: 0.3% of rows predicted BRIDGING, all wrong; dominance stays < 0.9.
    y_true = np.array([1] * 26 + [0] * 974)
    y_pred = np.zeros(1000, dtype=int)
    y_pred[100:103] = 1
    report = evaluate_predictions(y_true, y_pred, ["NOT_BRIDGING", "BRIDGING"], "BRIDGING")
    assert report.metrics["dominance"] < 0.9 and report.metrics["minority_f1"] == 0.0
    assert report.collapsed and report.collapse_reasons == ["BRIDGING never correctly predicted"]
    y_pred[0] = 1  # one right BRIDGING: not collapsed
    assert not evaluate_predictions(y_true, y_pred, ["NOT_BRIDGING", "BRIDGING"], "BRIDGING").collapsed


def test_effective_number_weights_and_logit_adjusted_loss():
    y = [0] * 90 + [1] * 10
    w = class_weights(y, 2, "effective", beta=0.99)
    expected = (1 - 0.99) / (1 - 0.99 ** np.array([90, 10]))
    assert np.allclose(w, expected * 2 / expected.sum())
    assert w[1] > w[0] and w[1] / w[0] < 9  # between none and balanced
    prior = torch.tensor([0.9, 0.1])
    loss = make_loss("logit_adjusted", None, prior=prior, tau=1.0)
    logits, target = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    loss.train()
    assert loss(logits, target).item() == pytest.approx(-np.log(0.1))  # softmax of log prior: p(1) = 0.1
    loss.eval()  # evaluation scores the plain logits
    assert loss(logits, target).item() == pytest.approx(np.log(2))


def test_mlproject_is_generated_from_the_task_table():
    from mycelium.mlproject import render

    assert (ROOT / "MLproject").read_text() == render(), "MLproject is stale: run python -m mycelium.mlproject"


def test_mlflow_reads_every_mlproject_default_as_the_task_table_gives_it(tmp_path):
    """Read by MLflow itself: each entry point's command, with no -P, carries the table's defaults
    (a bare "step_i,step_j" in the YAML once reached the trainer as "step_i")."""
    import shlex

    from mlflow.projects import _project_spec

    from mycelium.config import config_from_args
    from mycelium.mlproject import defaults
    from mycelium.tasks import TASKS

    project = _project_spec.load_project(str(ROOT))
    for task, spec in TASKS.items():
        argv = shlex.split(project.get_entry_point(task).compute_command({}, str(tmp_path)))[3:]
        cfg = config_from_args(argv, task)
        expected = config_from_args([], task)
        assert cfg.spec.input_fields == spec.input_fields, task
        for name in defaults(spec):
            if name != "inputs":  # "" and the table's composition are the same spec (checked above)
                assert getattr(cfg, name) == getattr(expected, name), (task, name)


# ------------------------------------------------------------------------------ a run on the real stack


@pytest.fixture(scope="module")
def gated_run(stack, tmp_path_factory):
    """C4 with context inputs cut to 64 tokens, a head that cannot learn (lr 1e-9: every epoch
    scores the same), early stopping after 1 flat epoch, and a gate no such head can pass."""
    tmp = tmp_path_factory.mktemp("recipe")
    prefix = f"s3://mycelium-data/tests/recipe-{uuid.uuid4().hex[:8]}"
    write_demo_corpus(prefix, files=4, per_file=150, seed=11, progress=False, tasks=("c4",))
    model = f"test-recipe-{uuid.uuid4().hex[:8]}"
    cfg = config_from_args(
        ["--data", f"{prefix}/c4/", "--backbone", "minilm", "--epochs", "4", "--lr-head", "1e-9", "--early-stopping", "1",
         "--min-metric", "0.99", "--threshold", "auto", "--inputs", "problem,step_i,step_j", "--max-length", "64", "--fallbacks", "none",
         "--numbers", "symbols",
         "--registered-model", model, "--experiment", f"exp-{model}"],
        "c4",
    )
    import os

    os.environ["MYCELIUM_STATE"] = str(tmp / "state")
    return cfg, run(cfg), tmp


def test_early_stopping_registers_only_the_epochs_run(gated_run):
    cfg, result, _ = gated_run
    attempt = result.attempts[0]
    assert [e.epoch for e in attempt.epochs] == [1, 2]
    versions = MlflowClient().search_model_versions(f"name = '{cfg.registered_model}'")
    assert sorted(v.tags["epoch"] for v in versions) == ["1", "2"]
    child = MlflowClient().get_run(attempt.run_id)
    assert child.data.tags["stopped_early"] == "true" and "early_stopping=1" in child.data.tags["stop_reason"]


def test_gate_keeps_a_weak_version_out_of_champion(gated_run):
    cfg, result, _ = gated_run
    assert result.winner is not None  # healthy enough to be the run's best ...
    assert not result.decision.promoted and "below min_metric" in result.decision.reason  # ... but never champion
    client = MlflowClient()
    with pytest.raises(Exception):
        client.get_model_version_by_alias(cfg.registered_model, "champion")
    versions = client.search_model_versions(f"name = '{cfg.registered_model}'")
    assert {v.tags["meets_min_metric"] for v in versions} == {"false"}
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["champion_decision"] == "kept" and "min_metric" in parent.data.tags["champion_reason"]


def test_threshold_is_stored_and_applied_by_pyfunc_and_cli(gated_run):
    cfg, result, tmp = gated_run
    _, best = result.winner
    uri = f"models:/{cfg.registered_model}/{best.version}"
    manifest_path = Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["threshold"] == best.threshold and manifest["threshold"]["label"] == "BRIDGING"
    assert manifest["input_fields"] == ["problem", "step_i", "step_j"] and manifest["context_fields"] == ["problem"]
    assert manifest["numbers"] == "symbols"
    t = manifest["threshold"]["value"]
    assert 0 < t < 1 and abs(t - 0.5) > 1e-6  # tuned, not the argmax cut

    # pyfunc: the label follows the threshold; probabilities are the model's own.
    problem = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 3
    rows = pd.DataFrame({"problem": [problem] * 3, "step_i": ["", "48/2 = <<48/2=24>>24", "48 * 60 = <<48*60=2880>>2880"],
                         "step_j": ["48/2 = <<48/2=24>>24", "48+24 = <<48+24=72>>72", "2880 / 100 = <<2880/100=28.8>>28.8"]})
    out = mlflow.pyfunc.load_model(uri).predict(rows)
    expected = np.where(out["prob_BRIDGING"] >= t, "BRIDGING", "NOT_BRIDGING")
    assert out["label"].tolist() == expected.tolist()
    # Serving maps numbers as training did: other values in the same places score the same.
    renamed = rows.apply(lambda col: col.str.replace("48", "50").str.replace("24", "25").str.replace("72", "75"))
    assert renamed.iloc[1, 2] != rows.iloc[1, 2]
    again = mlflow.pyfunc.load_model(uri).predict(renamed)
    np.testing.assert_allclose(again["prob_BRIDGING"], out["prob_BRIDGING"], atol=1e-6)

    # The CLI labels as pyfunc does.
    lines = "\n".join(json.dumps(r) for r in rows.to_dict("records")) + "\n"
    proc = subprocess.run([sys.executable, "-m", "mycelium.cli", "predict", "--task", "c4", "--registered-model",
                           cfg.registered_model, "--model", str(best.version), "--input", "-", "--quiet"],
                          input=lines, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [c["label"] for c in cli] == out["label"].tolist()
    for c, p in zip(cli, out["prob_BRIDGING"]):
        assert c["probabilities"]["BRIDGING"] == pytest.approx(p, abs=1e-5)


def test_head_recipe_search_registers_its_validation_winner(stack, tmp_path, monkeypatch):
    from mycelium.train import search

    monkeypatch.setenv("MYCELIUM_STATE", str(tmp_path / "state"))
    prefix = f"s3://mycelium-data/tests/search-{uuid.uuid4().hex[:8]}"
    write_demo_corpus(prefix, files=3, per_file=150, seed=5, progress=False, tasks=("c5",))
    model = f"test-search-{uuid.uuid4().hex[:8]}"
    cfg = config_from_args(["--data", f"{prefix}/c5/", "--backbone", "minilm", "--epochs", "2", "--search", "grid",
                            "--fallbacks", "none", "--max-length", "64", "--registered-model", model,
                            "--experiment", f"exp-{model}"], "c5")
    result = run(cfg)
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    [searched] = [r for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                  if r.data.tags.get("mycelium_role") == "search"]
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=searched.info.run_id, artifact_path="search_trials.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == len(search.grid(cfg))
    top = max(rows, key=lambda r: r["val_minority_f1"])  # first maximum in grid order, as search.best
    first = result.attempts[0].attempt
    assert (first.class_weights, first.loss, first.lr_head) == (top["class_weights"], top["loss"], top["lr_head"])
    child = client.get_run(result.attempts[0].run_id)
    assert float(child.data.params["lr_head"]) == top["lr_head"] and child.data.tags["class_weights"] == top["class_weights"]
    # The registered attempt retrains that recipe from the same start: it reaches the same best metric.
    best = result.attempts[0].best("minority_f1")
    assert best.report.metrics["minority_f1"] == pytest.approx(top["val_minority_f1"], abs=1e-6)


def test_threshold_never_picks_a_collapsed_rule():
    # A weak model on a 54% positive split: "everything positive" has the best F1 (0.70) but is
    # collapsed; the tuned cut must label both classes and stay under the dominance limit.
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.54).astype(int)
    p = np.clip(0.5 + 0.03 * (y - 0.5) + rng.normal(0, 0.1, 2000), 0, 1)
    t = decision.tune(y, p)
    labels = decision.predict(np.stack([1 - p, p], 1), ["INDEPENDENT", "DEPENDS"], {"label": "DEPENDS", "value": t})
    report = evaluate_predictions(y, labels, ["INDEPENDENT", "DEPENDS"], "DEPENDS")
    assert not report.collapsed and report.metrics["minority_f1"] > 0
    everything = evaluate_predictions(y, np.ones_like(y), ["INDEPENDENT", "DEPENDS"], "DEPENDS")
    assert everything.collapsed and everything.metrics["minority_f1"] > report.metrics["minority_f1"]
