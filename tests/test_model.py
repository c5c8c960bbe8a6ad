"""Backbone loading, pooling under both padding sides, freezing policy, head and optimizer groups.

Runs offline: a tiny random Qwen2 is written to a temp folder and MiniLM comes from its package.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from mycelium.model.backbone import (
    BackboneLoadError,
    load_backbone,
    resolve_backbone,
)
from mycelium.model.blocks import apply_freezing, final_norm, pool, transformer_blocks
from mycelium.model.classifier import Classifier, count_trainable, param_groups
from mycelium.model.tiny import make_tiny_bert, make_tiny_qwen2

TEXTS = [
    "Natalia sold 48/2 = 24 clips in May.",
    "She sold 48 + 24 = 72 clips altogether in April and May, which is a lot of clips.",
    "5 * 60 = 300",
]


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), num_layers=4, padding_side="left")


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2):
    return load_backbone(str(tiny_qwen2))


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


def test_pool_unit_left_and_right():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # value = flat position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last")[:, 0].tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last")[:, 0].tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean")[:, 0].tolist() == [0.5, 5.5]
    assert pool(hidden, left, "mean")[:, 0].tolist() == [2.5, 5.5]
    with pytest.raises(ValueError, match="last, mean"):
        pool(hidden, right, "cls")


def _alone(model: Classifier, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer([text], return_tensors="pt")
    return model.encode(enc["input_ids"], enc["attention_mask"])[0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_pooling_matches_unpadded_qwen2(qwen2, side, pooling):
    backbone, tokenizer, info = qwen2
    assert info.pooling == "mean" and info.is_decoder and info.architecture == "qwen2"  # the default
    tokenizer.padding_side = side
    model = Classifier(backbone, n_classes=3, pooling=pooling).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert (mask == 0).any()  # the batch really is padded
    # Padding sits where the tokenizer side says: the test exercises both layouts.
    col = 0 if side == "left" else -1
    assert (mask[:, col] == 0).any()
    with torch.no_grad():
        batched = model.encode(enc["input_ids"], mask)
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(batched[i], _alone(model, tokenizer, text), atol=1e-5, rtol=1e-4)
        logits = model(enc["input_ids"], mask)
    assert logits.shape == (3, 3)


def test_mean_pooling_ignores_padding_minilm(minilm):
    backbone, tokenizer, info = minilm
    assert info.pooling == "mean" and not info.is_decoder
    model = Classifier(backbone, n_classes=2).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        batched = model.encode(enc["input_ids"], enc["attention_mask"])
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(batched[i], _alone(model, tokenizer, text), atol=1e-5, rtol=1e-4)


def _block_params(blocks, n: int) -> int:
    return sum(p.numel() for b in blocks[len(blocks) - n :] for p in b.parameters()) if n else 0


@pytest.mark.parametrize("n", [0, 2, 4])
def test_freezing_counts_qwen2(qwen2, n):
    backbone = qwen2[0]
    blocks = transformer_blocks(backbone)
    assert blocks is backbone.layers and len(blocks) == 4
    norm = final_norm(backbone)
    assert norm is backbone.norm
    model = Classifier(backbone, n_classes=5)
    apply_freezing(backbone, n)
    expected = _block_params(blocks, n) + (sum(p.numel() for p in norm.parameters()) if n else 0)
    counts = count_trainable(model)
    assert counts["backbone"] == expected
    assert counts["head"] == sum(p.numel() for p in model.head.parameters())
    assert not backbone.embed_tokens.weight.requires_grad
    groups = param_groups(model, lr_head=1e-3, lr_backbone=2e-5)
    assert [g["name"] for g in groups] == (["head", "backbone"] if n else ["head"])
    assert groups[0]["lr"] == 1e-3 and (n == 0 or groups[1]["lr"] == 2e-5)
    assert sum(p.numel() for g in groups for p in g["params"]) == counts["total"]


@pytest.mark.parametrize("n", [0, 2, 4])
def test_freezing_counts_minilm(minilm, n):
    backbone = minilm[0]
    blocks = transformer_blocks(backbone)
    assert blocks is backbone.encoder.layer and len(blocks) == 6  # MiniLM-L6
    assert final_norm(backbone) is None
    model = Classifier(backbone, n_classes=2)
    apply_freezing(backbone, n)
    assert count_trainable(model)["backbone"] == _block_params(blocks, n)


def test_freezing_too_many_blocks(minilm):
    with pytest.raises(ValueError, match="has 6"):
        apply_freezing(minilm[0], 7)


def test_train_mode_keeps_frozen_parts_in_eval(tmp_path):
    backbone, _, _ = load_backbone(str(make_tiny_bert(tmp_path / "bert", num_layers=3)))
    model = Classifier(backbone, n_classes=2)
    apply_freezing(backbone, 1)
    model.train()
    blocks = transformer_blocks(backbone)
    assert model.head.training
    assert not backbone.embeddings.training and not blocks[0].training and not blocks[1].training
    assert blocks[2].training and all(m.training for m in blocks[2].modules())
    model.eval()
    assert not blocks[2].training and not model.head.training


def test_minilm_alias_loads_offline(offline):
    backbone, tokenizer, info = load_backbone("minilm")
    assert info.name == "minilm" and info.resolved == resolve_backbone("minilm")
    assert info.architecture == "bert" and info.num_blocks == 6 and info.hidden_size == 384
    assert info.revision.startswith("sha256:") and len(info.revision) == len("sha256:") + 64
    assert info.pooling == "mean"
    assert tokenizer.pad_token == "[PAD]"


def test_local_revision_is_content_hash(tiny_qwen2, tmp_path):
    other = make_tiny_qwen2(tmp_path / "other", num_layers=4, seed=1)
    a = load_backbone(str(tiny_qwen2))[2].revision
    b = load_backbone(str(other))[2].revision
    assert a.startswith("sha256:") and b.startswith("sha256:") and a != b


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    path = make_tiny_qwen2(tmp_path / "nopad", num_layers=1, pad_token=False)
    _, tokenizer, _ = load_backbone(str(path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] == 3


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "/nonexistent/folder/model"])
def test_bad_backbone_gives_clear_error(offline, name):
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(name)
    msg = str(err.value)
    assert name in msg and "-P backbone=" in msg and "minilm" in msg and "local folder" in msg


def test_hub_id_from_cache_records_commit_hash(offline, monkeypatch, tmp_path):
    # A hub-cache layout (models--ORG--NAME/snapshots/COMMIT) like a real download leaves behind.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    make_tiny_qwen2(repo / "snapshots" / commit, num_layers=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, _, info = load_backbone("tiny-org/tiny-qwen2")
    assert info.resolved == "tiny-org/tiny-qwen2"
    assert info.revision == commit
