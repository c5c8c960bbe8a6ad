"""Serving: a checkpoint logged as a models-from-code pyfunc, registered, and loaded back.

Against the real embedded stack (SeaweedFS + MLflow server). The registered model is loaded in a
fresh Python process that cannot import the installed project, so it runs from the logged copy
of the package (``code/mycelium.zip``) alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from mycelium.model.backbone import load_backbone
from mycelium.model.blocks import apply_freezing
from mycelium.model.classifier import Classifier
from mycelium.serving import checkpoint as ck
from mycelium.serving import package as serving

LABELS = ["NOT_BRIDGING", "BRIDGING"]
ROWS = [
    ("", "Natalia sold 48/2 = 24 clips in May."),
    ("Natalia sold 48/2 = 24 clips in May.", "She sold 48 + 24 = 72 clips altogether in April and May."),
    ("5 * 60 = 300", "300 / 4 = 75"),
    ("She earns $12 an hour.", "12 / 60 = 0.2 dollars per minute, so 0.2 * 50 = 10"),
]

# Runs in a fresh interpreter: hide the editable install of the project, load the registered
# model, predict, and report where `mycelium` was imported from.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    try:
        import mycelium
        raise SystemExit("the installed project is still importable: " + mycelium.__file__)
    except ImportError:
        pass
    import mlflow, pandas as pd
    uri, rows, columns, out = sys.argv[1:5]
    model = mlflow.pyfunc.load_model(uri)
    frame = model.predict(pd.DataFrame(json.loads(rows), columns=json.loads(columns)))
    import mycelium
    with open(out, "w") as f:
        json.dump({"frame": frame.to_dict(orient="split"), "mycelium": mycelium.__file__}, f)
    """
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    backbone, _, info = load_backbone("minilm")
    apply_freezing(backbone, 1)
    torch.manual_seed(0)
    model = Classifier(backbone, n_classes=len(LABELS)).eval()
    manifest = {
        "task": "c4",
        "labels": LABELS,
        "input_fields": ["step_i", "step_j"],
        "separator": " [SEP] ",
        "max_length": 64,
        "backbone": ck.backbone_manifest(info),
        "n_unfrozen": 1,
        "head": {"dropout": 0.1},
        "epoch": 0,
        "attempt": "base",
        "metrics": {"minority_f1": 0.25},
        "data_fingerprint": "sha256:test",
    }
    return ck.save_checkpoint(model, tmp_path_factory.mktemp("serving") / "epoch-0", manifest)


@pytest.fixture(scope="module")
def registered(stack, checkpoint_dir):
    name = f"mycelium-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment("test-serving")
    with mlflow.start_run():
        info = serving.log_checkpoint(checkpoint_dir, registered_model_name=name)
    assert info.registered_model_version is not None
    return name, info.registered_model_version, info


@pytest.fixture
def restore_sys_path(monkeypatch):
    # MLflow prepends the model's code/ folder to sys.path when loading in-process.
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_log_requires_active_run(checkpoint_dir):
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="inside an active MLflow run"):
        serving.log_checkpoint(checkpoint_dir)


def test_fresh_process_predicts_like_in_process(registered, checkpoint_dir, tmp_path):
    name, version, _ = registered
    model, tokenizer, manifest = ck.load_checkpoint(checkpoint_dir)
    expected = ck.predict_proba(model, tokenizer, manifest, ROWS)

    out = tmp_path / "out.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MYCELIUM_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, f"models:/{name}/{version}", json.dumps(ROWS),
         json.dumps(manifest["input_fields"]), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # The project came from the model's own code zip, not from this checkout.
    assert Path(result["mycelium"]).parts[-4:] == ("code", "mycelium.zip", "mycelium", "__init__.py")
    assert not Path(result["mycelium"]).is_relative_to(Path(ck.__file__).parents[1])

    frame = pd.DataFrame(**{k: result["frame"][k] for k in ("data", "columns")})
    assert list(frame.columns) == ["label", "prob_NOT_BRIDGING", "prob_BRIDGING"]
    got = frame[["prob_NOT_BRIDGING", "prob_BRIDGING"]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert frame["label"].tolist() == [LABELS[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_bad_requests_raise_with_reason(registered, restore_sys_path):
    from mlflow.pyfunc.scoring_server import invocations

    name, version, _ = registered
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")

    # C4 allows an empty step_i.
    ok = model.predict(pd.DataFrame({"step_i": [""], "step_j": ["5 * 60 = 300"]}))
    assert ok["label"].iloc[0] in LABELS and ok.shape == (1, 3)

    with pytest.raises(MlflowException, match=r"missing inputs \['step_j'\]") as e:
        model.predict(pd.DataFrame({"step_i": ["a"]}))
    assert "step_i" in str(e.value) and "required" in str(e.value)  # the schema lists what is required

    with pytest.raises(MlflowException, match=r"row 1, column 'step_j': empty string") as e:
        model.predict(pd.DataFrame({"step_i": ["a", "b"], "step_j": ["c", "  "]}))
    assert e.value.get_http_status_code() == 400

    with pytest.raises(MlflowException, match=r"row 0, column 'step_j': expected a string, got missing value"):
        model.predict(pd.DataFrame({"step_i": ["a"], "step_j": [None]}))

    n = serving.MAX_ROWS + 1
    too_many = pd.DataFrame({"step_i": ["a"] * n, "step_j": ["b"] * n})
    with pytest.raises(MlflowException, match=f"too many rows: {n} in one request, the limit is {serving.MAX_ROWS}"):
        model.predict(too_many)

    # What `mlflow models serve` does with a JSON request: HTTP 400 and the reason.
    body = json.dumps({"dataframe_split": {"columns": ["step_i", "step_j"], "data": [["a", ""]]}})
    with pytest.raises(MlflowException) as e:
        invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert e.value.get_http_status_code() == 400
    assert "row 0, column 'step_j': empty string" in e.value.message
    body = json.dumps({"dataframe_split": {"columns": ["step_i", "step_j"], "data": [["a", "b"]]}})
    response = invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert response.status == 200 and json.loads(response.response)["predictions"][0]["label"] in LABELS


def test_artifact_has_no_pickles_and_is_models_from_code(registered, tmp_path):
    name, version, info = registered
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path)))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert serving.find_pickles(local) == []
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))]
    assert {"MLmodel", "serving_model.py", "requirements.txt", "artifacts/checkpoint/manifest.json",
            "artifacts/checkpoint/trained.safetensors", "code/mycelium.zip"} <= set(files)
    with zipfile.ZipFile(local / "code" / "mycelium.zip") as z:
        assert {"mycelium/__init__.py", "mycelium/serving/checkpoint.py", "mycelium/serving/serving_model.py"} <= set(z.namelist())
        assert not [n for n in z.namelist() if "__pycache__" in n or n.endswith(".pyc")]
    # One request per file through the artifact proxy: the model stays a handful of files.
    assert len(files) <= 12, files

    flavor = info.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor and flavor["code"] == "code"
    mlmodel = (local / "MLmodel").read_text()
    assert str(Path(serving.__file__).parents[1]) not in mlmodel  # no path of this checkout

    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"torch", "transformers", "safetensors", "mlflow", "pandas", "numpy"}
    assert all("==" in r and "+" not in r for r in reqs)

    sig = info.signature
    assert sig.inputs.input_names() == ["step_i", "step_j"]
    assert [c.type.name for c in sig.inputs.inputs] == ["string", "string"]
    assert sig.outputs.input_names() == ["label", "prob_NOT_BRIDGING", "prob_BRIDGING"]
    assert [c.type.name for c in sig.outputs.inputs] == ["string", "double", "double"]


def test_validate_input_unit():
    manifest = {"input_fields": ["problem"], "allow_empty": [], "labels": ["A", "B"]}
    rows = serving.validate_input(pd.DataFrame({"problem": ["x", "y"], "extra": [1, 2]}), manifest)
    assert rows == [("x",), ("y",)]
    with pytest.raises(MlflowException, match=r"missing input column 'problem'; this model needs the columns problem"):
        serving.validate_input(pd.DataFrame({"text": ["x"]}), manifest)
    with pytest.raises(MlflowException, match=r"row 0, column 'problem': expected a string, got int"):
        serving.validate_input(pd.DataFrame({"problem": [3]}), manifest)
    with pytest.raises(MlflowException, match="too many rows: 3 in one request, the limit is 2"):
        serving.validate_input(pd.DataFrame({"problem": ["a", "b", "c"]}), manifest, max_rows=2)
    assert serving.validate_input(pd.DataFrame({"problem": []}), manifest) == []
    out = serving.output_frame(np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32), ["A", "B"])
    assert out["label"].tolist() == ["B", "A"] and out["prob_B"].dtype == np.float64


def test_template_instances_are_separate_models(checkpoint_dir, tmp_path):
    from mlflow.models import Model

    manifest = ck.read_manifest(checkpoint_dir)
    template = serving.ModelTemplate(manifest, bundled=False)
    try:
        a = template.instantiate(checkpoint_dir, tmp_path / "a", run_id="r1", model_id="m-1", artifact_path="x/1",
                                 metadata={"mycelium": {"epoch": 1}})
        b = template.instantiate(checkpoint_dir, tmp_path / "b", run_id="r1", model_id="m-2", artifact_path="x/2",
                                 metadata={"mycelium": {"epoch": 2}})
        assert (a.model_id, b.model_id) == ("m-1", "m-2") and a.model_uuid != b.model_uuid
        on_disk = [Model.load(str(tmp_path / d / "MLmodel")) for d in ("a", "b")]
        assert [m.metadata["mycelium"]["epoch"] for m in on_disk] == [1, 2]
        # The template itself is untouched (the MLmodel of an instance is a new file, not a write
        # through the hard link to the template's).
        assert Model.load(str(template.path / "MLmodel")).model_id is None
        assert (tmp_path / "a" / "artifacts" / "checkpoint" / "trained.safetensors").is_file()
        assert not list((template.path / "artifacts" / "checkpoint").iterdir())
    finally:
        template.close()
    assert not template.path.exists()
    # A checkpoint with other labels is refused before anything is logged.
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(dict(manifest, labels=["A", "B", "C"])))
    (other / "trained.safetensors").write_bytes((Path(checkpoint_dir) / "trained.safetensors").read_bytes())
    template = serving.ModelTemplate(manifest, bundled=False)
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", experiment_id="0"))
    try:
        with pytest.raises(ValueError, match=r"template was made for \(\('NOT_BRIDGING', 'BRIDGING'\)"):
            serving.log_checkpoint(other, template=template, run=run)
    finally:
        template.close()
