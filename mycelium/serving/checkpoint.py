"""Checkpoints that hold only what training changed, and the inference path shared with serving.

A checkpoint is a folder::

    manifest.json          what the model is (schema below, ``format_version: 1``)
    trained.safetensors    the head (``head.*``) and the trainable backbone parameters, i.e. the
                           unfrozen last blocks + the final norm; names as in ``model.state_dict()``
    backbone/              optional: a full copy of the backbone folder (config, weights,
                           tokenizer) for air-gapped serving, see ``bundle_backbone``

No pickle anywhere: tensors are safetensors, metadata is JSON. The frozen backbone is not saved;
the manifest names it (``backbone.name`` as the user gave it, never an absolute path of the
training machine) with its ``revision`` (hub commit or ``sha256:`` of the weight files), and
``load_checkpoint`` loads it again through ``mycelium.model.backbone.load_backbone``.

Manifest schema (``format_version: 1``); the caller supplies the fields marked *, the rest is
filled in by ``save_checkpoint``::

    format_version   1
    task*            "c4" | "c5" | "c6" | any name
    labels*          [str, ...]  ordered: logit i is labels[i]; >= 2, unique
    input_fields*    [str, ...]  record fields joined in this order
    allow_empty      [str, ...]  input fields that may be ""; default: the task table's, else []
    separator*       str         joins the input fields (text.join_inputs)
    context_fields   [str, ...]  input fields truncation cuts first (text.encode_rows); default []
    numbers          "keep" | "symbols"   numbers as written or mapped to N1, N2, ... (text.number_symbols); default "keep"
    max_length*      int > 0     tokenizer truncation
    threshold        {label, value} | null   binary decision rule (mycelium.train.threshold); null = argmax
    backbone*        {name, revision, architecture, pooling, hidden_size,
                      num_blocks (filled), source (filled: hub | alias | local)}
    n_unfrozen*      int >= 0    last blocks trained (+ final norm); must match the saved tensors
    head*            {dropout: float in [0, 1)}   (n_classes, hidden_size filled)
    epoch*           int >= 0
    attempt*         str | int   which training attempt (e.g. "base", "unfreeze", "focal")
    metrics*         {str: number | null}
    data_fingerprint* str
    tensors          {file: "trained.safetensors", sha256, names: [sorted], n_params} (filled)
    created_with     {mycelium, torch, transformers, safetensors} versions (filled)

Extra top-level keys are kept as given (they must be JSON-serialisable).

``backbone_manifest(info)`` builds the backbone section from a ``BackboneInfo``; for a backbone
loaded from a local folder it records the folder's name and ``source: "local"`` (such a checkpoint
then loads with a bundled ``backbone/`` folder, ``backbone_override=`` or the ``MYCELIUM_BACKBONE``
environment variable read by the serving model).

Several checkpoints on the same backbone share the frozen backbone weights in memory: the
backbone is loaded once per (weights, device, dtype) into a module-level cache, and each model
gets its own module tree (``copy.deepcopy`` with the frozen parameters and buffers memoised to
themselves) in which only the unfrozen blocks and the final norm are real copies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mycelium import text
from mycelium.model.pooling import POOLINGS
from mycelium.model.backbone import (
    PACKAGED_ALIASES,
    BackboneInfo,
    _looks_like_path,
    load_backbone,
    resolve_backbone,
    weights_hash,
)
from mycelium.model.blocks import (
    apply_freezing,
    model_device,
    transformer_blocks,
    unfrozen_modules,
)
from mycelium.model.classifier import Classifier

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "trained.safetensors"
BUNDLED_BACKBONE_DIR = "backbone"
BACKBONE_SOURCES = ("hub", "alias", "local")

_REQUIRED = (
    "task", "labels", "input_fields", "separator", "max_length", "backbone", "n_unfrozen", "head",
    "epoch", "attempt", "metrics", "data_fingerprint",
)
_BACKBONE_REQUIRED = ("name", "revision", "architecture", "pooling", "hidden_size")


class CheckpointError(ValueError):
    """A checkpoint is malformed, tampered with, or does not fit its backbone; the message says how."""


# ---------------------------------------------------------------------------------------------
# Manifest


def backbone_manifest(info: BackboneInfo) -> dict:
    """The manifest's ``backbone`` section for a loaded backbone.

    Hub ids and the packaged aliases (``minilm``, ``smollm2``) are recorded as given; a local folder is recorded by its
    folder name only (``source: "local"``), so no path of the training machine ends up in the model.
    """
    name = info.name
    if name.strip().lower() in PACKAGED_ALIASES:
        source, name = "alias", name.strip().lower()
    elif os.path.isdir(name) or _looks_like_path(name):
        source, name = "local", Path(os.path.normpath(os.path.expanduser(name))).name or "backbone"
    else:
        source = "hub"
    return {
        "name": name,
        "source": source,
        "revision": info.revision,
        "architecture": info.architecture,
        "pooling": info.pooling,
        "hidden_size": info.hidden_size,
        "num_blocks": info.num_blocks,
        "is_decoder": info.is_decoder,
    }


def _err(where: str, why: str) -> CheckpointError:
    return CheckpointError(f"manifest: {where} {why}")


def _str_list(manifest: dict, key: str, *, min_len: int = 1) -> list[str]:
    value = manifest.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _err(key, f"must be a list of non-empty strings, got {value!r}")
    if len(value) < min_len:
        raise _err(key, f"needs at least {min_len} entries, got {len(value)}")
    if len(set(value)) != len(value):
        raise _err(key, f"has duplicates: {list(value)!r}")
    return list(value)


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _err(where, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def validate_manifest(manifest: dict, *, complete: bool = True) -> dict:
    """Check a manifest against the schema; returns a normalised copy (lists, ints, floats).

    ``complete=False`` checks only what the caller of ``save_checkpoint`` supplies; ``True`` also
    requires the fields ``save_checkpoint`` fills in. Raises ``CheckpointError`` naming the field.
    """
    if not isinstance(manifest, dict):
        raise CheckpointError(f"manifest must be a dict, got {type(manifest).__name__}")
    m = copy.deepcopy(manifest)
    missing = [k for k in _REQUIRED if k not in m]
    if complete:
        missing += [k for k in ("format_version", "allow_empty", "tensors") if k not in m]
    if missing:
        raise CheckpointError(f"manifest is missing {', '.join(missing)}")
    if complete and m["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"manifest format_version {m['format_version']!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    if not isinstance(m["task"], str) or not m["task"]:
        raise _err("task", f"must be a non-empty string, got {m['task']!r}")
    m["labels"] = _str_list(m, "labels", min_len=2)
    m["input_fields"] = _str_list(m, "input_fields")
    if "allow_empty" in m:
        allow = m["allow_empty"]
        if not isinstance(allow, (list, tuple)) or not all(isinstance(v, str) for v in allow):
            raise _err("allow_empty", f"must be a list of field names, got {allow!r}")
        unknown = [f for f in allow if f not in m["input_fields"]]
        if unknown:
            raise _err("allow_empty", f"names fields that are not input fields: {unknown!r}")
        m["allow_empty"] = list(allow)
    context = m.get("context_fields", [])
    if not isinstance(context, (list, tuple)) or any(f not in m["input_fields"] for f in context):
        raise _err("context_fields", f"must be a list of input fields, got {context!r}")
    m["context_fields"] = list(context)
    m.setdefault("numbers", "keep")
    if m["numbers"] not in text.NUMBER_MODES:
        raise _err("numbers", f"must be one of {', '.join(text.NUMBER_MODES)}, got {m['numbers']!r}")
    t = m.get("threshold")
    if t is not None:
        if not isinstance(t, dict) or t.get("label") not in m["labels"] or len(m["labels"]) != 2:
            raise _err("threshold", f"must be null or {{label: one of two labels, value}}, got {t!r}")
        value = t.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise _err("threshold.value", f"must be a probability in [0, 1], got {value!r}")
        m["threshold"] = {"label": t["label"], "value": float(value)}
    if not isinstance(m["separator"], str):
        raise _err("separator", f"must be a string, got {m['separator']!r}")
    m["max_length"] = _int(m["max_length"], "max_length", 1)
    m["n_unfrozen"] = _int(m["n_unfrozen"], "n_unfrozen", 0)
    m["epoch"] = _int(m["epoch"], "epoch", 0)
    if isinstance(m["attempt"], bool) or not isinstance(m["attempt"], (str, int)):
        raise _err("attempt", f"must be a string or an integer, got {m['attempt']!r}")
    if not isinstance(m["data_fingerprint"], str) or not m["data_fingerprint"]:
        raise _err("data_fingerprint", f"must be a non-empty string, got {m['data_fingerprint']!r}")

    metrics = m["metrics"]
    if not isinstance(metrics, dict):
        raise _err("metrics", f"must be a dict of name -> number, got {type(metrics).__name__}")
    clean = {}
    for k, v in metrics.items():
        if v is None:
            clean[str(k)] = None
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _err(f"metrics.{k}", f"must be a number, got {v!r}")
        clean[str(k)] = float(v) if math.isfinite(float(v)) else None  # JSON has no NaN
    m["metrics"] = clean

    head = m["head"]
    if not isinstance(head, dict) or "dropout" not in head:
        raise _err("head", f"must be a dict with 'dropout', got {head!r}")
    dropout = head["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise _err("head.dropout", f"must be a number in [0, 1), got {dropout!r}")
    head["dropout"] = float(dropout)

    bb = m["backbone"]
    if not isinstance(bb, dict):
        raise _err("backbone", f"must be a dict, got {type(bb).__name__}")
    missing = [k for k in _BACKBONE_REQUIRED if k not in bb]
    if missing:
        raise _err("backbone", f"is missing {', '.join(missing)} (build it with checkpoint.backbone_manifest(info))")
    for key in ("name", "revision", "architecture"):
        if not isinstance(bb[key], str) or not bb[key]:
            raise _err(f"backbone.{key}", f"must be a non-empty string, got {bb[key]!r}")
    if os.path.isabs(bb["name"]) or os.path.isabs(os.path.expanduser(bb["name"])) or _looks_like_path(bb["name"]):
        raise _err(
            "backbone.name",
            f"{bb['name']!r} is a local path; record a hub id, the 'minilm' alias or the folder name "
            "(checkpoint.backbone_manifest(info) does this)",
        )
    if bb["pooling"] not in POOLINGS:
        raise _err("backbone.pooling", f"must be one of {', '.join(POOLINGS)}, got {bb['pooling']!r}")
    bb["hidden_size"] = _int(bb["hidden_size"], "backbone.hidden_size", 1)
    if "num_blocks" in bb:
        bb["num_blocks"] = _int(bb["num_blocks"], "backbone.num_blocks", 1)
        if m["n_unfrozen"] > bb["num_blocks"]:
            raise _err("n_unfrozen", f"{m['n_unfrozen']} exceeds the backbone's {bb['num_blocks']} blocks")
    if "source" in bb and bb["source"] not in BACKBONE_SOURCES:
        raise _err("backbone.source", f"must be one of {', '.join(BACKBONE_SOURCES)}, got {bb['source']!r}")

    if complete:
        t = m["tensors"]
        if not isinstance(t, dict) or not {"file", "sha256", "names"} <= set(t):
            raise _err("tensors", f"must be a dict with file, sha256, names; got {t!r}")
        if t["file"] != TENSORS_FILE or not re.fullmatch(r"[0-9a-f]{64}", str(t["sha256"])):
            raise _err("tensors", f"has a bad file name or sha256: {t['file']!r}, {t['sha256']!r}")
        if not isinstance(t["names"], list) or not all(isinstance(n, str) for n in t["names"]):
            raise _err("tensors.names", "must be a list of strings")
        for key in ("hidden_size", "n_classes"):
            if key in head:
                head[key] = _int(head[key], f"head.{key}", 1)
    try:
        json.dumps(m, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"manifest is not JSON-serialisable: {e}") from None
    return m


def _default_allow_empty(task: str, input_fields: list[str]) -> list[str]:
    from mycelium.tasks import TASKS

    spec = TASKS.get(task.lower())
    if spec is None or list(spec.input_fields) != list(input_fields):
        return []
    return list(spec.allow_empty)


def _few(names: list[str], n: int = 5) -> str:
    return str(names[:n]) + ("..." if len(names) > n else "")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict:
    """The validated manifest of a checkpoint folder."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a mycelium checkpoint: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return validate_manifest(manifest, complete=True)


# ---------------------------------------------------------------------------------------------
# Which tensors training changed


def _expected_trained_names(model: Classifier, n_unfrozen: int) -> set[str]:
    """``state_dict`` names of the head and of the parameters of the last ``n_unfrozen`` blocks + norm."""
    ids = {id(p) for mod in unfrozen_modules(model.backbone, n_unfrozen) for p in mod.parameters()}
    names = {f"head.{k}" for k in model.head.state_dict()}
    names |= {f"backbone.{n}" for n, p in model.backbone.named_parameters(remove_duplicate=False) if id(p) in ids}
    return names


def trained_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the whole head plus every backbone parameter with ``requires_grad``."""
    sd = model.state_dict(keep_vars=True)
    out = {}
    for name, t in sd.items():
        if name.startswith("head.") or (name.startswith("backbone.") and t.requires_grad):
            out[name] = t.detach()
    return out


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(model: Classifier, directory: str | Path, manifest: dict) -> Path:
    """Write ``trained.safetensors`` (head + trainable backbone params) and ``manifest.json``.

    ``manifest`` holds the caller's fields (see the module docstring); they are validated and
    checked against the model (labels vs head size, hidden size, pooling, and that the trainable
    backbone parameters are exactly the last ``n_unfrozen`` blocks + final norm). Returns the folder.
    """
    from safetensors.torch import save_file

    m = validate_manifest(manifest, complete=False)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    if len(m["labels"]) != model.n_classes:
        raise CheckpointError(f"manifest has {len(m['labels'])} labels but the head has {model.n_classes} outputs")
    bb = m["backbone"]
    if bb["hidden_size"] != model.hidden_size:
        raise CheckpointError(f"manifest backbone.hidden_size {bb['hidden_size']} != model's {model.hidden_size}")
    if bb["pooling"] != model.pooling:
        raise CheckpointError(f"manifest backbone.pooling {bb['pooling']!r} != model's {model.pooling!r}")
    num_blocks = len(transformer_blocks(model.backbone))
    if bb.setdefault("num_blocks", num_blocks) != num_blocks:
        raise CheckpointError(f"manifest backbone.num_blocks {bb['num_blocks']} != model's {num_blocks}")
    if m["n_unfrozen"] > num_blocks:
        raise CheckpointError(f"n_unfrozen {m['n_unfrozen']} exceeds the backbone's {num_blocks} blocks")
    bb.setdefault("source", "alias" if bb["name"].lower() in PACKAGED_ALIASES else "hub")

    state = trained_state(model)
    expected = _expected_trained_names(model, m["n_unfrozen"])
    if set(state) != expected:
        extra, lacking = sorted(set(state) - expected), sorted(expected - set(state))
        raise CheckpointError(
            f"the model's trainable parameters do not match n_unfrozen={m['n_unfrozen']}: "
            + (f"trainable outside the last {m['n_unfrozen']} blocks/final norm: {_few(extra)}; " if extra else "")
            + (f"frozen inside them: {_few(lacking)}" if lacking else "")
        )

    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in sorted(state.items())}
    tmp = directory / (TENSORS_FILE + ".tmp")
    meta = {"format": "pt", "mycelium_format_version": str(FORMAT_VERSION), "task": m["task"]}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, directory / TENSORS_FILE)

    m.setdefault("allow_empty", _default_allow_empty(m["task"], m["input_fields"]))
    m["head"].update(n_classes=model.n_classes, hidden_size=model.hidden_size)
    m["tensors"] = {
        "file": TENSORS_FILE,
        "sha256": _file_sha256(directory / TENSORS_FILE),
        "names": sorted(tensors),
        "n_params": int(sum(t.numel() for t in tensors.values())),
    }
    m["created_with"] = _versions()
    m["format_version"] = FORMAT_VERSION
    m = validate_manifest(m, complete=True)
    ordered = {"format_version": FORMAT_VERSION, **{k: v for k, v in m.items() if k != "format_version"}}
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(ordered, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST_FILE)
    return directory


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    import mycelium

    return {
        "mycelium": mycelium.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def bundle_backbone(directory: str | Path, backbone: str, revision: str | None = None) -> Path:
    """Copy the backbone folder (config, weights, tokenizer) into ``<checkpoint>/backbone/`` so the
    checkpoint loads with no hub and no package (air-gapped serving). ``backbone`` is a local
    folder, the ``minilm`` alias, or a hub id present in the local Hugging Face cache."""
    import shutil

    src = resolve_backbone(backbone)
    if not os.path.isdir(src):
        from huggingface_hub import snapshot_download

        src = snapshot_download(src, revision=revision, local_files_only=True)
    dst = Path(directory) / BUNDLED_BACKBONE_DIR
    if dst.exists():
        shutil.rmtree(dst)
    # Follow symlinks (the HF cache links snapshot files to blobs); skip caches and pickles.
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns(
        "__pycache__", "*.py", "*.pyc", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", ".git*", "onnx", "openvino"))
    if not any(dst.glob("*.safetensors")):
        shutil.rmtree(dst)
        raise CheckpointError(
            f"cannot bundle backbone {backbone!r}: it has no *.safetensors weights (pickle formats are not bundled)"
        )
    return dst


# ---------------------------------------------------------------------------------------------
# Load


_CACHE: dict[tuple, tuple[PreTrainedModel, PreTrainedTokenizerBase, BackboneInfo]] = {}
_CACHE_LOCK = threading.RLock()


def clear_backbone_cache() -> None:
    """Drop the shared backbones (models already loaded keep theirs)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _is_sha(revision: str) -> bool:
    return revision.startswith("sha256:")


def _pick_source(directory: Path, manifest: dict, backbone_override: str | None) -> tuple[str, str | None, str]:
    """(what to pass to load_backbone, revision to pass, how it was chosen)."""
    bb = manifest["backbone"]
    if backbone_override:
        return backbone_override, None, "override"
    bundled = directory / BUNDLED_BACKBONE_DIR
    if bundled.is_dir():
        return str(bundled), None, "bundled"
    if bb.get("source") == "local":
        raise CheckpointError(
            f"the checkpoint's backbone was a local folder named {bb['name']!r} (revision {bb['revision']}); "
            f"bundle it into {BUNDLED_BACKBONE_DIR}/ (checkpoint.bundle_backbone), pass backbone_override=<folder> "
            "or set MYCELIUM_BACKBONE=<folder> for the serving model"
        )
    rev = bb["revision"]
    hub_rev = None if (_is_sha(rev) or rev == "unknown" or bb["name"].lower() in PACKAGED_ALIASES) else rev
    return bb["name"], hub_rev, "name"


def _base_backbone(source: str, revision: str | None, device: torch.device, dtype: torch.dtype | None):
    resolved = resolve_backbone(source)
    if os.path.isdir(resolved):
        key: tuple = ("local", weights_hash(resolved), str(device), str(dtype))
    else:
        key = ("hub", resolved, revision, str(device), str(dtype))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            backbone, tokenizer, info = load_backbone(source, revision=revision, dtype=dtype)
            backbone.requires_grad_(False)
            backbone.eval()
            backbone.to(device)
            hit = _CACHE[key] = (backbone, tokenizer, info)
        return hit


def _private_copy(base: PreTrainedModel, n_unfrozen: int) -> PreTrainedModel:
    """A new module tree sharing every frozen parameter/buffer of ``base``; the last ``n_unfrozen``
    blocks and the final norm (when ``n_unfrozen > 0``) get their own tensors."""
    own = {id(t) for mod in unfrozen_modules(base, n_unfrozen) for t in (*mod.parameters(), *mod.buffers())}
    memo = {id(t): t for t in (*base.parameters(), *base.buffers()) if id(t) not in own}
    backbone = copy.deepcopy(base, memo)
    apply_freezing(backbone, n_unfrozen)  # the copies become trainable again, shared params stay frozen
    return backbone


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    backbone_override: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Classifier, PreTrainedTokenizerBase, dict]:
    """Load a checkpoint: ``(classifier in eval mode, tokenizer, manifest)``.

    The backbone comes from ``backbone_override`` (a folder, hub id or ``minilm``) if given, else
    from a bundled ``backbone/`` folder in the checkpoint, else by the manifest's name + revision.
    Every saved tensor must be consumed and every unfrozen parameter provided; shape mismatches,
    a changed ``trained.safetensors`` (sha256) or a backbone of another architecture, size or
    weight hash raise ``CheckpointError``. The returned tokenizer is shared by all models on the
    same backbone: do not mutate it.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    tpath = directory / manifest["tensors"]["file"]
    if not tpath.is_file():
        raise CheckpointError(f"{directory} has a manifest but no {TENSORS_FILE}")
    digest = _file_sha256(tpath)
    if digest != manifest["tensors"]["sha256"]:
        raise CheckpointError(
            f"{tpath.name} does not match manifest.json: sha256 {digest[:16]}... != "
            f"{manifest['tensors']['sha256'][:16]}... "
            "(the file was changed, truncated or belongs to another checkpoint)"
        )
    tensors = load_file(str(tpath), device="cpu")
    if sorted(tensors) != sorted(manifest["tensors"]["names"]):
        raise CheckpointError(
            f"{tpath.name} holds other tensors than manifest.json lists: "
            f"{sorted(set(tensors) ^ set(manifest['tensors']['names']))[:5]}"
        )

    device = torch.device(device)
    bb = manifest["backbone"]
    source, revision, how = _pick_source(directory, manifest, backbone_override)
    base, tokenizer, info = _base_backbone(source, revision, device, dtype)
    if how == "bundled":
        what = f"bundled backbone in {directory.name}/{BUNDLED_BACKBONE_DIR}"
    else:
        what = f"backbone {source!r} ({how})"
    for key in ("architecture", "hidden_size", "num_blocks"):
        have = getattr(info, key)
        if key in bb and bb[key] != have:
            raise CheckpointError(f"{what} does not fit the checkpoint: {key} {have!r} != {bb[key]!r}")
    if info.revision != bb["revision"]:
        if _is_sha(info.revision) and _is_sha(bb["revision"]):
            raise CheckpointError(
                f"{what} has other weights than the checkpoint was trained on: "
                f"{info.revision[:23]}... != {bb['revision'][:23]}..."
            )
        warnings.warn(
            f"{what} has revision {info.revision!r}, the checkpoint names {bb['revision']!r}; "
            "they cannot be compared, make sure they are the same weights",
            stacklevel=2,
        )

    n_unfrozen = manifest["n_unfrozen"]
    if n_unfrozen > info.num_blocks:
        raise CheckpointError(f"n_unfrozen {n_unfrozen} exceeds the backbone's {info.num_blocks} blocks")
    backbone = _private_copy(base, n_unfrozen)
    model = Classifier(
        backbone, n_classes=len(manifest["labels"]), pooling=bb["pooling"], dropout=manifest["head"]["dropout"]
    )
    model.head.to(device)

    expected = _expected_trained_names(model, n_unfrozen)
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unexpected or missing:
        raise CheckpointError(
            f"{tpath.name} does not fit n_unfrozen={n_unfrozen} on {info.architecture}: "
            + (f"unexpected tensors {_few(unexpected)}; " if unexpected else "")
            + (f"missing tensors {_few(missing)}" if missing else "")
        )
    target = model.state_dict()
    bad = [
        f"{name}: saved {tuple(t.shape)}, model {tuple(target[name].shape)}"
        for name, t in tensors.items()
        if tuple(t.shape) != tuple(target[name].shape)
    ]
    if bad:
        raise CheckpointError(f"{tpath.name} has tensors of the wrong shape: " + "; ".join(bad[:5]))
    with torch.no_grad():
        for name, t in tensors.items():
            target[name].copy_(t)
    model.eval()
    return model, tokenizer, manifest


# ---------------------------------------------------------------------------------------------
# Inference


def predict_proba(
    model: Classifier,
    tokenizer: PreTrainedTokenizerBase,
    manifest: dict,
    rows: list[tuple[str, ...]],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class probabilities ``[N, k]`` (float32, columns in ``manifest["labels"]`` order) for raw rows.

    Each row holds the values of ``manifest["input_fields"]`` in order; rows are joined and
    tokenized exactly as in training (``mycelium.text.encode_rows``), sorted by length so batches
    pad little, and returned in the original order. Labels come from ``mycelium.train.threshold.predict``.
    """
    k = len(manifest["labels"])
    n_fields = len(manifest["input_fields"])
    if not rows:
        return np.zeros((0, k), dtype=np.float32)
    for i, row in enumerate(rows):
        if len(row) != n_fields:
            fields = ", ".join(manifest["input_fields"])
            raise ValueError(f"row {i} has {len(row)} values, expected {n_fields} ({fields})")
    ids = text.encode_rows(tokenizer, rows, manifest["input_fields"], manifest["separator"], manifest["max_length"],
                           manifest.get("context_fields", ()), manifest.get("numbers", "keep"))
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ValueError(f"rows {empty[:10]} tokenize to no tokens")
    device = model_device(model) if device is None else torch.device(device)
    if device.type != model_device(model).type:
        # Moving here would move the backbone weights shared with other loaded models.
        raise ValueError(
            f"the model is on {model_device(model)}, not {device}: load it with load_checkpoint(..., device=...)"
        )
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    side = getattr(tokenizer, "padding_side", "right") or "right"
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out = np.empty((len(ids), k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = text.pad_batch([ids[i] for i in idx], pad_id, side=side)
            logits = model(input_ids.to(device), mask.to(device))
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return out
