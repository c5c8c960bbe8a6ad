"""Log a checkpoint as an MLflow pyfunc model that loads and serves without pickle.

``log_checkpoint(checkpoint_dir)`` (inside the caller's active run) logs

* ``serving_model.py`` as the model's code ("models from code": MLflow executes the file on load,
  nothing is cloudpickled),
* the ``mycelium`` package as one zip, ``code/mycelium.zip`` (``code_paths``), which the model's
  code file puts first on ``sys.path`` when loading, so the model loads where the project is not
  installed,
* the checkpoint folder as the artifact ``checkpoint`` (``manifest.json``, ``trained.safetensors``,
  and a bundled ``backbone/`` if present),
* a signature (the task's input columns as strings -> ``label`` + ``prob_<LABEL>`` doubles) and an
  explicit pip requirement list pinned to the installed versions.

A downstream service then needs only ``mlflow.pyfunc.load_model("models:/mycelium-c6@champion")``
or ``mlflow models serve -m models:/mycelium-c6@champion``.

Requests: a DataFrame (or the JSON ``dataframe_split`` / ``dataframe_records`` / ``inputs`` forms
of ``mlflow models serve``) with one string column per input field; at most ``MAX_ROWS`` rows
per request. Values must be non-empty strings, except the fields the task allows to be empty
(C4's ``step_i`` before the first step). Violations raise ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` naming the row and column, which ``mlflow models serve`` answers with
HTTP 400 and the reason.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Rows per request. A request this size runs a few seconds on a GPU and minutes on a CPU for a
# 0.5B backbone; larger batches belong in a batch job (mlflow.pyfunc.spark_udf or a loop).
MAX_ROWS = 10_000

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole mycelium package ships with the model
SERVING_MODEL_FILE = Path(__file__).resolve().parent / "serving_model.py"

# Installed packages the served model imports; pinned to the versions of this environment.
_RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt", ".cloudpickle")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validate_input(model_input, manifest: dict, max_rows: int = MAX_ROWS) -> list[tuple[str, ...]]:
    """The request as rows of input-field values, or ``MlflowException(INVALID_PARAMETER_VALUE)``
    naming the missing column, or the row and column of a non-string / empty value."""
    fields = list(manifest["input_fields"])
    allow_empty = set(manifest.get("allow_empty", ()))
    if isinstance(model_input, dict) or isinstance(model_input, list):
        try:
            model_input = pd.DataFrame(model_input)
        except (ValueError, TypeError) as e:
            raise _invalid(f"input is not a table with columns {', '.join(fields)}: {e}") from None
    if not isinstance(model_input, pd.DataFrame):
        raise _invalid(
            f"input must be a DataFrame with columns {', '.join(fields)}, got {type(model_input).__name__}"
        )
    missing = [f for f in fields if f not in model_input.columns]
    if missing:
        raise _invalid(
            f"missing input column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            f"this model needs the columns {', '.join(fields)}"
        )
    if len(model_input) > max_rows:
        raise _invalid(f"too many rows: {len(model_input)} in one request, the limit is {max_rows}; split the request")
    columns = [model_input[f].tolist() for f in fields]
    problems: list[str] = []
    for field, values in zip(fields, columns):
        for row, value in enumerate(values):
            if not isinstance(value, str):
                missing_value = value is None or (isinstance(value, float) and np.isnan(value))
                kind = "missing value" if missing_value else type(value).__name__
                problems.append(f"row {row}, column {field!r}: expected a string, got {kind} ({value!r})")
            elif field not in allow_empty and not value.strip():
                problems.append(f"row {row}, column {field!r}: empty string")
            if len(problems) >= 5:
                break
        if len(problems) >= 5:
            break
    if problems:
        may = f" (only {', '.join(sorted(allow_empty))} may be empty)" if allow_empty else ""
        raise _invalid("invalid input: " + "; ".join(problems) + may)
    return list(zip(*columns)) if columns and len(model_input) else []


def output_frame(probs: np.ndarray, labels: Sequence[str], threshold: dict | None = None) -> pd.DataFrame:
    """``label`` (the manifest's decision rule: tuned threshold or argmax) and ``prob_<LABEL>``
    (float64) per class, in the manifest's label order."""
    from mycelium.train import threshold as decision

    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(labels))
    out = {"label": [labels[i] for i in decision.predict(probs, labels, threshold)]}
    for j, label in enumerate(labels):
        out[f"prob_{label}"] = probs[:, j]
    return pd.DataFrame(out, columns=["label", *[f"prob_{label}" for label in labels]])


def signature_for(manifest: dict):
    """Inputs: one string column per input field. Outputs: ``label`` string + ``prob_<LABEL>`` doubles."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", f) for f in manifest["input_fields"]])
    probs = [ColSpec("double", f"prob_{label}") for label in manifest["labels"]]
    outputs = Schema([ColSpec("string", "label"), *probs])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _version(package: str) -> str:
    # Local version labels such as torch's "+cpu" / "+cu126" are not on PyPI: pin the public part.
    return importlib.metadata.version(package).split("+", 1)[0]


def pip_requirements_for(manifest: dict, bundled: bool) -> list[str]:
    reqs = [f"{p}=={_version(p)}" for p in _RUNTIME_PACKAGES]
    if manifest["backbone"].get("source") == "alias" and not bundled:
        from mycelium.model.packaged import ALIAS_REQUIREMENTS

        reqs.extend(ALIAS_REQUIREMENTS.get(manifest["backbone"]["name"], ()))
    return reqs


def find_pickles(directory: str | Path) -> list[Path]:
    """Files under ``directory`` that are (or contain) pickles: by suffix, by the pickle protocol
    header, or zip archives (torch.save) with a ``.pkl`` member."""
    found = []
    for path in sorted(Path(directory).rglob("*")):
        if not path.is_file():
            continue
        name = path.name.lower()
        if name.endswith(_PICKLE_SUFFIXES):
            found.append(path)
            continue
        if name.endswith(".safetensors"):  # 8-byte header length could look like a pickle opcode
            continue
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            found.append(path)
        elif head == b"PK":
            try:
                with zipfile.ZipFile(path) as z:
                    if any(n.endswith((".pkl", ".pickle")) for n in z.namelist()):
                        found.append(path)
            except zipfile.BadZipFile:
                pass
    return found


def package_zip() -> Path:
    """The ``mycelium`` package as one zip (pure Python, importable by ``zipimport``), built once
    per process. The model ships its code as this single file rather than MLflow's ``code/<pkg>/``
    tree: every file is one request through the artifact proxy, and one file instead of ~40 cuts
    the per-epoch upload to a fraction (``serving_model.py`` puts the zip on ``sys.path``)."""
    global _PACKAGE_ZIP
    if _PACKAGE_ZIP is None or not _PACKAGE_ZIP.is_file():
        folder = Path(tempfile.mkdtemp(prefix="mycelium-code-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        target = folder / CODE_ZIP_NAME
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(PACKAGE_DIR.rglob("*.py")):
                if "__pycache__" not in path.parts:
                    z.write(path, (Path(PACKAGE_DIR.name) / path.relative_to(PACKAGE_DIR)).as_posix())
        _PACKAGE_ZIP = target
    return _PACKAGE_ZIP


_PACKAGE_ZIP: Path | None = None
CODE_ZIP_NAME = "mycelium.zip"
UPLOAD_THREADS = 8


class ModelTemplate:
    """What the pyfunc models of one attempt's epochs share, saved once with
    ``mlflow.pyfunc.save_model``: MLmodel (flavor, signature), environment files, the code zip and
    ``serving_model.py``. ``instantiate`` adds an epoch's checkpoint and identity (run, logged
    model, metadata): no per-epoch ``save_model``, and its first-call cost (MLflow checks every
    pinned requirement against the installed packages) is paid once, off the training thread.
    """

    def __init__(self, manifest: dict, bundled: bool, input_example_rows: Sequence[Sequence[str]] | None = None):
        import mlflow

        self.key = _template_key(manifest, bundled)
        self._tmp = tempfile.TemporaryDirectory(prefix="mycelium-model-")
        root = Path(self._tmp.name)
        # MLflow records the absolute paths of the code file and of the artifact sources in
        # MLmodel (it reads only base names back): save from this folder so no path of the
        # checkout ends up in the model.
        code_file = root / "src" / SERVING_MODEL_FILE.name
        placeholder = root / "src" / "checkpoint"  # each epoch's checkpoint goes here
        placeholder.mkdir(parents=True)
        shutil.copyfile(SERVING_MODEL_FILE, code_file)
        input_example = None
        if input_example_rows is not None:
            input_example = pd.DataFrame([list(r) for r in input_example_rows], columns=list(manifest["input_fields"]))
            validate_input(input_example, manifest)
        self.path = root / "model"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(
                str(self.path), python_model=str(code_file), artifacts={"checkpoint": str(placeholder)},
                code_paths=[str(package_zip())], signature=signature_for(manifest), input_example=input_example,
                pip_requirements=pip_requirements_for(manifest, bundled),
            )
        for pycache in self.path.rglob("__pycache__"):  # save_model executes the code file
            shutil.rmtree(pycache, ignore_errors=True)

    def instantiate(self, checkpoint_dir: Path, dest: Path, *, run_id: str, model_id: str, artifact_path: str, metadata: dict):
        """The complete model folder of one checkpoint at ``dest``; returns its ``mlflow.models.Model``."""
        import datetime
        import uuid

        from mlflow.models import Model

        shutil.copytree(self.path, dest, copy_function=_link_or_copy)
        shutil.copytree(checkpoint_dir, dest / "artifacts" / "checkpoint", dirs_exist_ok=True, copy_function=_link_or_copy)
        mlmodel = Model.load(str(dest / "MLmodel"))
        mlmodel.run_id, mlmodel.model_id, mlmodel.artifact_path = run_id, model_id, artifact_path
        mlmodel.model_uuid = uuid.uuid4().hex
        mlmodel.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
        mlmodel.metadata = metadata
        (dest / "MLmodel").unlink()  # a hard link to the template's: write a new file, not through the link
        mlmodel.save(str(dest / "MLmodel"))
        return mlmodel

    def close(self) -> None:
        self._tmp.cleanup()


def _template_key(manifest: dict, bundled: bool) -> tuple:
    return (tuple(manifest["labels"]), tuple(manifest["input_fields"]), manifest["backbone"].get("source"), bundled)


def log_checkpoint(
    checkpoint_dir: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    version_tags: dict[str, str] | None = None,
    logged_model=None,
    template: ModelTemplate | None = None,
    input_example_rows: Sequence[Sequence[str]] | None = None,
    run=None,
):
    """Log a checkpoint folder as a pyfunc model of the active run and, with
    ``registered_model_name``, register it as a new version (``version_tags`` go with that one
    request). Returns MLflow's ``ModelInfo`` (``registered_model_version`` set when registered).

    ``logged_model``: a ``LoggedModel`` made by ``start_logged_model`` (so the epoch's metrics
    can be logged against it first); by default one is created here. ``template``: a
    ``ModelTemplate`` for checkpoints like this one (a training reuses one per attempt); by
    default one is made for this call.

    Why not ``mlflow.pyfunc.log_model``: per call it re-reads every metric history of the run to
    copy this step's metrics onto the model (tens of requests), and uploads file by file. Here the
    model folder comes from ``mlflow.pyfunc.save_model`` (the same MLmodel, environment files and
    signature), is uploaded in parallel, and registered with one request.

    ``input_example_rows`` (rows of input-field values) are stored as the input example (with a
    template of this call's own).
    ``run``: the run (``mlflow.entities.Run``) to log to, default the active run; threads other
    than the one that started the run must pass it (MLflow's active run is per thread).
    """
    import mlflow
    from mlflow import MlflowClient

    from mycelium.serving.checkpoint import BUNDLED_BACKBONE_DIR, read_manifest

    run = run or mlflow.active_run()
    if run is None:
        raise RuntimeError("log_checkpoint must be called inside an active MLflow run (mlflow.start_run()) or be given run=")
    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    pickles = find_pickles(checkpoint_dir)
    if pickles:
        names = [p.relative_to(checkpoint_dir).as_posix() for p in pickles]
        raise MlflowException(f"refusing to log {checkpoint_dir}: it holds pickle files {names}")
    bundled = (checkpoint_dir / BUNDLED_BACKBONE_DIR).is_dir()
    own_template = template is None or input_example_rows is not None
    if own_template:
        template = ModelTemplate(manifest, bundled, input_example_rows)
    elif template.key != _template_key(manifest, bundled):
        raise ValueError(f"the model template was made for {template.key}, this checkpoint is {_template_key(manifest, bundled)}")

    client = MlflowClient()
    lm = logged_model or start_logged_model(name, manifest, run)
    try:
        with tempfile.TemporaryDirectory(prefix="mycelium-serving-") as staging:
            local = Path(staging) / "model"
            mlmodel = template.instantiate(checkpoint_dir, local, run_id=run.info.run_id, model_id=lm.model_id,
                                           artifact_path=lm.artifact_location,
                                           metadata={"mycelium": _model_metadata(manifest, bundled)})
            upload_folder(local, lm.artifact_location)
        lm = client.finalize_logged_model(lm.model_id, "READY")
    except BaseException:
        if logged_model is None:  # a caller's model stays pending for its retry
            _finalize_failed(client, lm.model_id)
        raise
    finally:
        if own_template:
            template.close()
    info = mlmodel.get_model_info(logged_model=lm)
    flavor = (info.flavors or {}).get("python_function", {})
    if "python_model" in flavor or "model_code_path" not in flavor:
        raise MlflowException(f"the logged model {info.model_uri} is not a models-from-code model: {flavor}")
    if registered_model_name:
        mv = register_version(registered_model_name, lm.model_id, run.info.run_id, version_tags)
        info.registered_model_version = int(mv.version)
    return info


def start_logged_model(name: str, manifest: dict, run=None):
    """A pending MLflow 3 ``LoggedModel`` of ``run`` (default: the active run), linked to the run
    at the manifest's epoch (the run page lists it; metrics logged with its ``model_id`` show on
    the model page)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    run = run or mlflow.active_run()
    client = MlflowClient()
    params = {"task": manifest["task"], "epoch": manifest["epoch"], "attempt": manifest["attempt"],
              "backbone": manifest["backbone"]["name"], "n_unfrozen": manifest["n_unfrozen"]}
    lm = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run.info.run_id,
                                    params={k: str(v) for k, v in params.items()},
                                    tags={"mlflow.loggedModel.flavor": "python_function"})
    client.log_outputs(run.info.run_id, [LoggedModelOutput(lm.model_id, step=int(manifest["epoch"]))])
    return lm


def register_version(registered_model: str, model_id: str, run_id: str, tags: dict[str, str] | None = None):
    """A new version of ``registered_model`` for a logged model: one request (the registered model
    is created when it does not exist yet)."""
    from mlflow import MlflowClient
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = MlflowClient()
    tags = {k: str(v) for k, v in (tags or {}).items()}

    def create():
        return client.create_model_version(registered_model, source=f"models:/{model_id}", run_id=run_id,
                                           tags=tags, model_id=model_id)

    try:
        return create()
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(registered_model)
        return create()


def upload_folder(local: str | Path, artifact_uri: str) -> None:
    """Every file under ``local`` to ``artifact_uri``, keeping relative paths, several requests at
    once. MLflow's own ``log_artifacts`` for the HTTP artifact proxy sends one file at a time; the
    per-request latency, not bandwidth, is what a model of small files costs."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    local = Path(local)
    repo = get_artifact_repository(artifact_uri)
    files = [p for p in sorted(local.rglob("*")) if p.is_file()]

    def upload(path: Path) -> None:
        rel = path.parent.relative_to(local).as_posix()
        repo.log_artifact(str(path), None if rel == "." else rel)

    with ThreadPoolExecutor(max_workers=min(UPLOAD_THREADS, max(len(files), 1))) as pool:
        list(pool.map(upload, files))  # list(): re-raise the first failure here


def _finalize_failed(client, model_id: str) -> None:
    try:
        client.finalize_logged_model(model_id, "FAILED")
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make staging a bundled backbone free; MLflow rejects symlinks out of the folder.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _model_metadata(manifest: dict, bundled: bool) -> dict:
    bb = manifest["backbone"]
    return {
        "task": manifest["task"],
        "labels": manifest["labels"],
        "input_fields": manifest["input_fields"],
        "backbone": bb["name"],
        "backbone_revision": bb["revision"],
        "backbone_bundled": bundled,
        "n_unfrozen": manifest["n_unfrozen"],
        "epoch": manifest["epoch"],
        "attempt": manifest["attempt"],
        "data_fingerprint": manifest["data_fingerprint"],
        "max_rows": MAX_ROWS,
    }
