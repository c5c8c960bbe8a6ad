"""Checkpoints: save -> load round trips, what the file holds, shared frozen weights, tampering.

No stack needed: MiniLM comes from its package and a tiny random Qwen2 is written to a temp folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mycelium.model.backbone import load_backbone
from mycelium.model.blocks import apply_freezing, transformer_blocks
from mycelium.model.classifier import Classifier
from mycelium.model.tiny import make_tiny_bert, make_tiny_qwen2
from mycelium.serving import checkpoint as ck

ROWS = [
    ("", "Natalia sold 48/2 = 24 clips in May."),
    ("Natalia sold 48/2 = 24 clips in May.", "She sold 48 + 24 = 72 clips altogether in April and May."),
    ("5 * 60 = 300", "300 / 4 = 75"),
    ("x", "y"),
    ("She earns $12 an hour for 50 minutes of babysitting.", "12 / 60 = 0.2 dollars per minute, so 0.2 * 50 = 10"),
]
HEAD_TENSORS = 6  # norm.{weight,bias}, dense.{weight,bias}, out.{weight,bias}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", num_layers=3, padding_side="left")


def make_model(backbone_name: str, n_unfrozen: int, labels=("NOT_BRIDGING", "BRIDGING"), seed: int = 0):
    """A classifier as training leaves it: random head, unfrozen blocks moved away from pretrained."""
    backbone, tokenizer, info = load_backbone(backbone_name)
    apply_freezing(backbone, n_unfrozen)
    torch.manual_seed(seed)
    model = Classifier(backbone, n_classes=len(labels), dropout=0.1)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    manifest = {
        "task": "c4",
        "labels": list(labels),
        "input_fields": ["step_i", "step_j"],
        "separator": " [SEP] ",
        "max_length": 64,
        "backbone": ck.backbone_manifest(info),
        "n_unfrozen": n_unfrozen,
        "head": {"dropout": 0.1},
        "epoch": 2,
        "attempt": "base",
        "metrics": {"minority_f1": 0.5, "macro_f1": float("nan")},
        "data_fingerprint": "sha256:feedbeef",
    }
    return model.eval(), tokenizer, manifest


def logits(model, tokenizer, manifest, rows=ROWS):
    from mycelium import text

    ids = text.tokenize(tokenizer, [text.join_inputs(r, manifest["separator"]) for r in rows], manifest["max_length"])
    input_ids, mask = text.pad_batch(ids, tokenizer.pad_token_id, side=tokenizer.padding_side)
    with torch.inference_mode():
        return model(input_ids, mask)


def trainable_names(model) -> set[str]:
    return {f"backbone.{n}" for n, p in model.backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which,n_unfrozen", [("minilm", 0), ("minilm", 2), ("qwen2", 1)])
def test_round_trip_identical_logits(which, n_unfrozen, tiny_qwen2, tmp_path):
    name = "minilm" if which == "minilm" else str(tiny_qwen2)
    model, tokenizer, manifest = make_model(name, n_unfrozen)
    ck.save_checkpoint(model, tmp_path / "ckpt", manifest)

    # The file holds only the head and the unfrozen blocks (+ the final norm, for Qwen2).
    saved = load_file(str(tmp_path / "ckpt" / ck.TENSORS_FILE))
    head = {n for n in saved if n.startswith("head.")}
    assert len(head) == HEAD_TENSORS
    assert set(saved) - head == trainable_names(model)
    blocks = transformer_blocks(model.backbone)
    per_block = len(list(blocks[-1].parameters()))
    norm = 1 if which == "qwen2" and n_unfrozen else 0  # Qwen2's final RMSNorm has one weight
    assert len(saved) == HEAD_TENSORS + n_unfrozen * per_block + norm
    if which == "qwen2":
        assert "backbone.norm.weight" in saved and all(
            n.startswith(("head.", "backbone.layers.2.", "backbone.norm.")) for n in saved
        )

    manifest_text = (tmp_path / "ckpt" / ck.MANIFEST_FILE).read_text()
    manifest_on_disk = json.loads(manifest_text)
    assert manifest_on_disk["format_version"] == 1
    assert manifest_on_disk["tensors"]["names"] == sorted(saved)
    assert manifest_on_disk["metrics"]["macro_f1"] is None  # NaN is not JSON
    assert manifest_on_disk["allow_empty"] == ["step_i"]  # from the task table
    assert str(tmp_path) not in manifest_text and str(tiny_qwen2) not in manifest_text  # no local paths
    if which == "qwen2":
        assert manifest_on_disk["backbone"]["name"] == "tiny-qwen2"
        assert manifest_on_disk["backbone"]["source"] == "local"
        with pytest.raises(ck.CheckpointError, match="local folder named 'tiny-qwen2'"):
            ck.load_checkpoint(tmp_path / "ckpt")
        loaded, tok2, man2 = ck.load_checkpoint(tmp_path / "ckpt", backbone_override=str(tiny_qwen2))
    else:
        assert manifest_on_disk["backbone"]["name"] == "minilm"
        loaded, tok2, man2 = ck.load_checkpoint(tmp_path / "ckpt")

    assert not loaded.training and man2["labels"] == manifest["labels"]
    torch.testing.assert_close(logits(loaded, tok2, man2), logits(model, tokenizer, manifest), rtol=0, atol=1e-6)

    # predict_proba: sorted into length batches, returned in the original order.
    probs = ck.predict_proba(loaded, tok2, man2, ROWS, batch_size=2)
    expected = torch.softmax(logits(model, tokenizer, manifest).float(), -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert probs.shape == (len(ROWS), 2) and probs.dtype == np.float32
    assert ck.predict_proba(loaded, tok2, man2, []).shape == (0, 2)


def test_bundled_backbone_loads_without_override(tiny_qwen2, tmp_path):
    model, tokenizer, manifest = make_model(str(tiny_qwen2), 1)
    ck.save_checkpoint(model, tmp_path / "ckpt", manifest)
    ck.bundle_backbone(tmp_path / "ckpt", str(tiny_qwen2))
    loaded, tok2, man2 = ck.load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(logits(loaded, tok2, man2), logits(model, tokenizer, manifest), rtol=0, atol=1e-6)


def test_models_share_frozen_weights_not_unfrozen_blocks(tmp_path):
    ck.clear_backbone_cache()
    model, _, manifest = make_model("minilm", 2)
    ck.save_checkpoint(model, tmp_path / "a", manifest)
    model0, _, manifest0 = make_model("minilm", 0, labels=("INDEPENDENT", "DEPENDS"), seed=1)
    ck.save_checkpoint(model0, tmp_path / "b", {**manifest0, "task": "c5"})

    a, tok_a, _ = ck.load_checkpoint(tmp_path / "a")
    a2, _, _ = ck.load_checkpoint(tmp_path / "a")
    b, tok_b, _ = ck.load_checkpoint(tmp_path / "b")
    assert tok_a is tok_b
    assert a.backbone is not a2.backbone and a.backbone is not b.backbone  # own module trees

    pa, pa2, pb = (dict(m.backbone.named_parameters()) for m in (a, a2, b))
    frozen = [n for n in pa if not n.startswith(("encoder.layer.4.", "encoder.layer.5."))]
    unfrozen = [n for n in pa if n.startswith(("encoder.layer.4.", "encoder.layer.5."))]
    assert frozen and unfrozen
    for n in frozen:
        assert pa[n].data_ptr() == pa2[n].data_ptr() == pb[n].data_ptr(), n
        assert not pa[n].requires_grad
    for n in unfrozen:
        assert pa[n].data_ptr() != pa2[n].data_ptr(), n
        assert pa[n].data_ptr() != pb[n].data_ptr(), n
    # Buffers (position ids) are shared too.
    ba, bb_ = dict(a.backbone.named_buffers()), dict(b.backbone.named_buffers())
    assert all(ba[n].data_ptr() == bb_[n].data_ptr() for n in ba)

    # Changing one model's unfrozen block leaves the others alone; b keeps the pretrained block.
    before = logits(a2, tok_a, manifest)
    b_before = logits(b, tok_b, manifest0)
    with torch.no_grad():
        pa["encoder.layer.5.output.dense.weight"].zero_()
    torch.testing.assert_close(logits(a2, tok_a, manifest), before, rtol=0, atol=0)
    torch.testing.assert_close(logits(b, tok_b, manifest0), b_before, rtol=0, atol=0)
    # A loaded model saves again to the same tensors (requires_grad marks the unfrozen blocks).
    ck.save_checkpoint(a2, tmp_path / "again", manifest)
    assert sorted(load_file(str(tmp_path / "again" / ck.TENSORS_FILE))) == sorted(
        load_file(str(tmp_path / "a" / ck.TENSORS_FILE))
    )


def _rewrite(directory, edit):
    """Change the tensors, then make the manifest consistent again (names + sha256)."""
    path = directory / ck.TENSORS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    manifest = json.loads((directory / ck.MANIFEST_FILE).read_text())
    manifest["tensors"]["names"] = sorted(tensors)
    manifest["tensors"]["sha256"] = ck._file_sha256(path)
    (directory / ck.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def saved_minilm(tmp_path_factory):
    model, _, manifest = make_model("minilm", 1)
    return ck.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "ckpt", manifest)


def _copy(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "copy")


def test_tampered_file_is_refused(saved_minilm, tmp_path):
    d = _copy(saved_minilm, tmp_path)
    raw = bytearray((d / ck.TENSORS_FILE).read_bytes())
    raw[-3] ^= 0xFF
    (d / ck.TENSORS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match="does not match manifest.json: sha256"):
        ck.load_checkpoint(d)


LAYER0_BIAS = "backbone.encoder.layer.0.output.dense.bias"
LAYER5_WEIGHT = "backbone.encoder.layer.5.output.dense.weight"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.__setitem__("head.out.weight", torch.zeros(3, 384)),
         r"wrong shape: head\.out\.weight: saved \(3, 384\), model \(2, 384\)"),
        (lambda t: t.__setitem__(LAYER0_BIAS, torch.zeros(384)), r"unexpected tensors \['backbone\.encoder\.layer\.0"),
        (lambda t: t.pop("head.out.bias"), r"missing tensors \['head\.out\.bias'\]"),
        (lambda t: t.pop(LAYER5_WEIGHT), r"missing tensors \['backbone\.encoder\.layer\.5"),
    ],
    ids=["shape", "unexpected", "missing-head", "missing-block"],
)
def test_mismatched_tensors_give_clear_errors(saved_minilm, tmp_path, edit, message):
    d = _copy(saved_minilm, tmp_path)
    _rewrite(d, edit)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_checkpoint(d)


def test_manifest_names_disagreeing_with_file(saved_minilm, tmp_path):
    d = _copy(saved_minilm, tmp_path)
    manifest = json.loads((d / ck.MANIFEST_FILE).read_text())
    manifest["tensors"]["names"] = manifest["tensors"]["names"][1:]
    (d / ck.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match="other tensors than manifest.json lists"):
        ck.load_checkpoint(d)


def test_wrong_backbone_is_refused(saved_minilm, tmp_path):
    other = make_tiny_bert(tmp_path / "bert", hidden_size=64)
    with pytest.raises(ck.CheckpointError, match="does not fit the checkpoint: hidden_size 64 != 384"):
        ck.load_checkpoint(saved_minilm, backbone_override=str(other))


def test_manifest_validation_on_save(tmp_path):
    model, _, manifest = make_model("minilm", 1)
    with pytest.raises(ck.CheckpointError, match="missing data_fingerprint"):
        ck.save_checkpoint(model, tmp_path / "x", {k: v for k, v in manifest.items() if k != "data_fingerprint"})
    with pytest.raises(ck.CheckpointError, match="is a local path"):
        local = {**manifest["backbone"], "name": str(tmp_path)}
        ck.save_checkpoint(model, tmp_path / "x", {**manifest, "backbone": local})
    with pytest.raises(ck.CheckpointError, match="3 labels but the head has 2"):
        ck.save_checkpoint(model, tmp_path / "x", {**manifest, "labels": ["A", "B", "C"]})
    with pytest.raises(ck.CheckpointError, match="do not match n_unfrozen=2"):
        ck.save_checkpoint(model, tmp_path / "x", {**manifest, "n_unfrozen": 2})
    with pytest.raises(ck.CheckpointError, match="allow_empty names fields that are not input fields"):
        ck.save_checkpoint(model, tmp_path / "x", {**manifest, "allow_empty": ["problem"]})
    with pytest.raises(ck.CheckpointError, match="labels has duplicates"):
        ck.save_checkpoint(model, tmp_path / "x", {**manifest, "labels": ["A", "A"]})
    assert not (tmp_path / "x" / ck.MANIFEST_FILE).exists()
