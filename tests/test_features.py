"""Feature caching: pooled features and prefix states reproduce the full forward; gradients flow
through the trainable blocks only; the on-disk cache round-trips and its key covers every part.

Offline: a tiny random Qwen2 and BERT are written to temp folders, MiniLM comes from its package.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mycelium.cache.passes import (
    PrefixStates,
    compute_pooled,
    compute_prefix,
    for_each_batch,
    verify_suffix,
)
from mycelium.cache.store import (
    FeatureCache,
    auto_cache_budget_gb,
    available_ram_bytes,
    cached_compute,
    default_cache_root,
    fits,
    prefix_bytes,
)
from mycelium.model.pooling import DEFAULT_POOLING
from mycelium.model.backbone import load_backbone
from mycelium.model.blocks import apply_freezing, transformer_blocks
from mycelium.model.classifier import Classifier
from mycelium.model.suffix import suffix_encode, supports_suffix
from mycelium.model.tiny import make_tiny_bert, make_tiny_qwen2
from mycelium.text import pad_batch, tokenize

_WORDS = (
    "Natalia sold 48/2 = 24 clips in May. She sold 48 + 24 = 72 clips altogether in April and May. "
    "Weng earns 12 an hour for babysitting; yesterday she did 50 minutes, so 12/60 = 0.2 per minute "
    "and 0.2 * 50 = 10 dollars. Betty has half of the 100 dollars she needs for a new wallet."
).split()
# Lengths from 1 word to the whole passage, in a scrambled order, so batches need real padding.
TEXTS = [" ".join(_WORDS[(7 * i) % 11 : (7 * i) % 11 + 1 + (13 * i) % len(_WORDS)]) for i in range(18)]


def _build(path, pooling=DEFAULT_POOLING):
    backbone, tok, info = load_backbone(str(path), pooling=pooling)
    model = Classifier(backbone, n_classes=3, pooling=pooling, dropout=0.0)
    model.eval()
    ids = tokenize(tok, TEXTS, max_length=128)
    return model, tok, info, ids


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    torch.manual_seed(0)
    return _build(make_tiny_qwen2(tmp_path_factory.mktemp("qwen"), num_layers=4), pooling="last")  # the pooled-token MLP path


@pytest.fixture(scope="module")
def qwen_mean(tmp_path_factory):
    torch.manual_seed(0)
    return _build(make_tiny_qwen2(tmp_path_factory.mktemp("qwen_mean"), num_layers=4))  # the default pooling


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    return _build(make_tiny_bert(tmp_path_factory.mktemp("bert"), num_layers=3))


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return _build("minilm")


def _reference(model, ids, pad_id):
    """model.encode on each input alone: no padding at all."""
    with torch.no_grad():
        return torch.cat([model.encode(*pad_batch([s], pad_id)) for s in ids]).float()


def _full(model, ids, pad_id, side):
    with torch.no_grad():
        return model.encode(*pad_batch(ids, pad_id, side)).float()


# ---------------------------------------------------------------------------------------------
# (a) pooled features


@pytest.mark.parametrize(
    "which,side", [("minilm", "right"), ("qwen", "left"), ("qwen", "right"), ("qwen_mean", "left"), ("qwen_mean", "right")]
)
def test_compute_pooled_matches_encode(which, side, request):
    model, tok, _, ids = request.getfixturevalue(which)
    assert len({len(s) for s in ids}) > 5
    # A small budget forces several length buckets; the result must come back in input order.
    feats = compute_pooled(model, ids, pad_id=tok.pad_token_id, pad_side=side, token_budget=96, progress=False)
    assert feats.shape == (len(ids), model.hidden_size) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _reference(model, ids, tok.pad_token_id), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, _full(model, ids, tok.pad_token_id, side), atol=1e-5, rtol=1e-5)
    # An ordinary tensor (not an inference tensor): a head can train on it.
    assert not feats.is_inference()
    model.classify(feats).sum().backward()
    model.zero_grad(set_to_none=True)


def test_compute_pooled_keeps_modes_and_rejects_empty(qwen):
    model, tok, _, ids = qwen
    apply_freezing(model.backbone, 2)
    try:
        model.train()
        trainable_block = transformer_blocks(model.backbone)[-1]
        assert trainable_block.training and model.head.training
        compute_pooled(model, ids[:3], pad_id=tok.pad_token_id, progress=False)
        assert trainable_block.training and model.head.training
    finally:
        model.backbone.requires_grad_(False)
        model.eval()
    with pytest.raises(ValueError, match="no tokens"):
        compute_pooled(model, [ids[0], []], pad_id=tok.pad_token_id, progress=False)


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (the CI machine may have another count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_batches_run_two_at_a_time_with_half_the_threads(two_threads):
    # Both batches must be inside fn at once to pass the barrier: run one after the other, they would time out.
    barrier = threading.Barrier(2, timeout=20)
    seen = []

    def fn(batch):
        barrier.wait()
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return sum(batch)

    assert list(for_each_batch([[1, 2], [3]], fn, torch.device("cpu"))) == [3, 3]
    assert len({ident for ident, _ in seen}) == 2 and {n for _, n in seen} == {1}
    assert torch.get_num_threads() == 2
    # Results keep the batch order; an error in one batch reaches the caller and the threads come back.
    assert list(for_each_batch([[i] for i in range(7)], lambda b: b[0] * 10, torch.device("cpu"))) == [0, 10, 20, 30, 40, 50, 60]

    def bad(batch):
        if batch == [3]:
            raise ValueError("batch 3 broke")
        return batch

    with pytest.raises(ValueError, match="batch 3 broke"):
        list(for_each_batch([[i] for i in range(7)], bad, torch.device("cpu")))
    assert torch.get_num_threads() == 2
    # One thread: the caller's thread runs every batch.
    torch.set_num_threads(1)
    assert list(for_each_batch([[1], [2]], lambda b: threading.get_ident(), torch.device("cpu"))) == [threading.get_ident()] * 2


def test_two_batches_at_a_time_give_the_one_at_a_time_results(qwen, two_threads):
    model, tok, _, ids = qwen
    kw = dict(pad_id=tok.pad_token_id, pad_side="left", token_budget=64, progress=False)
    pooled2, prefix2 = compute_pooled(model, ids, **kw), compute_prefix(model, ids, 2, **kw)
    torch.set_num_threads(1)
    pooled1, prefix1 = compute_pooled(model, ids, **kw), compute_prefix(model, ids, 2, **kw)
    torch.testing.assert_close(pooled2, pooled1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(prefix2.hidden, prefix1.hidden, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) prefix + suffix == full forward


@pytest.mark.parametrize("first_trainable", [0, 2, 4])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["qwen", "qwen_mean"])
def test_suffix_matches_encode_qwen2(which, side, first_trainable, request):
    model, tok, info, ids = request.getfixturevalue(which)
    assert info.num_blocks == 4 and supports_suffix(model)
    # The prefix is computed with the other padding side and other batches than the suffix sees.
    other = "right" if side == "left" else "left"
    states = compute_prefix(
        model, ids, first_trainable, pad_id=tok.pad_token_id, pad_side=other, token_budget=80, progress=False
    )
    assert states.total_tokens == sum(len(s) for s in ids) and len(states) == len(ids)
    assert states.hidden.dtype == torch.float32 and not states.hidden.is_inference()
    hidden, mask = states.batch(list(range(len(ids))), side)
    _, ref_mask = pad_batch(ids, tok.pad_token_id, side)
    assert torch.equal(mask, ref_mask)
    with torch.no_grad():
        got = suffix_encode(model, hidden, mask, first_trainable)
    torch.testing.assert_close(got, _full(model, ids, tok.pad_token_id, side), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, _reference(model, ids, tok.pad_token_id), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which,cuts", [("bert", (0, 1, 3)), ("minilm", (0, 4, 6))])
def test_suffix_matches_encode_bert(which, cuts, request):
    model, tok, info, ids = request.getfixturevalue(which)
    assert info.num_blocks == cuts[-1] and supports_suffix(model)
    ref = _full(model, ids, tok.pad_token_id, "right")
    for first_trainable in cuts:
        states = compute_prefix(model, ids, first_trainable, pad_id=tok.pad_token_id, progress=False)
        order = list(reversed(range(len(ids))))  # any order of rows
        hidden, mask = states.batch(order, "right")
        with torch.no_grad():
            got = suffix_encode(model, hidden, mask, first_trainable)
        torch.testing.assert_close(got, ref[order], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_block_runs_its_mlp_only_at_the_pooled_token(qwen, side):
    """With ``last`` pooling the last block's MLP sees one row per input, not every position, and
    features and gradients still equal the full forward's."""
    model, tok, info, ids = qwen
    assert model.pooling == "last"
    blocks = transformer_blocks(model.backbone)
    seen: list[tuple[int, ...]] = []
    handle = blocks[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    apply_freezing(model.backbone, 2)
    try:
        model.train()
        states = compute_prefix(model, ids, 2, pad_id=tok.pad_token_id, progress=False)
        hidden, mask = states.batch(list(range(len(ids))), side)
        seen.clear()
        got = suffix_encode(model, hidden, mask, 2)
        assert seen == [(len(ids), model.hidden_size)]
        labels = torch.tensor([i % 3 for i in range(len(ids))])
        F.cross_entropy(model.classify(got), labels).backward()
        part = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        seen.clear()
        full = model.encode(*pad_batch(ids, tok.pad_token_id, side))
        assert seen == [(len(ids), max(len(s) for s in ids), model.hidden_size)]  # the full forward: every position
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
        F.cross_entropy(model.classify(full), labels).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(part[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        assert part["backbone.layers.3.mlp.down_proj.weight"].abs().sum() > 0
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.backbone.requires_grad_(False)
        model.eval()


def test_prefix_half_precision_and_verify(qwen):
    model, tok, _, ids = qwen
    states = compute_prefix(model, ids, 2, pad_id=tok.pad_token_id, store_dtype=torch.bfloat16, progress=False)
    assert states.hidden.dtype == torch.bfloat16
    assert states.nbytes >= prefix_bytes(states.total_tokens, model.hidden_size, torch.bfloat16)
    hidden, mask = states.batch([0, 5, 9], "left")
    with torch.no_grad():
        got = suffix_encode(model, hidden, mask, 2)
    ref = _full(model, [ids[i] for i in (0, 5, 9)], tok.pad_token_id, "left")
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert verify_suffix(model, ids[:6], 2, pad_id=tok.pad_token_id, pad_side="left") < 1e-4


# ---------------------------------------------------------------------------------------------
# (c) gradients through the trainable blocks


def test_gradients_match_full_forward(qwen):
    model, tok, info, ids = qwen
    first_trainable = 2
    apply_freezing(model.backbone, info.num_blocks - first_trainable)
    try:
        model.train()
        labels = torch.tensor([i % 3 for i in range(len(ids))])
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any(n.startswith("backbone.") for n in trainable)

        def grads():
            out = {n: p.grad.clone() for n, p in trainable.items()}
            model.zero_grad(set_to_none=True)
            return out

        F.cross_entropy(model(*pad_batch(ids, tok.pad_token_id, "left")), labels).backward()
        full = grads()

        states = compute_prefix(model, ids, first_trainable, pad_id=tok.pad_token_id, progress=False)
        hidden, mask = states.batch(list(range(len(ids))), "left")
        assert not hidden.requires_grad
        F.cross_entropy(model.classify(suffix_encode(model, hidden, mask, first_trainable)), labels).backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        part = grads()
        assert full.keys() == part.keys()
        for name in full:
            torch.testing.assert_close(part[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
            assert full[name].abs().sum() > 0, name
    finally:
        model.backbone.requires_grad_(False)
        model.eval()


# ---------------------------------------------------------------------------------------------
# (d) the on-disk cache and the memory budget


def test_cache_round_trip(tmp_path, caplog):
    cache = FeatureCache(tmp_path / "features")
    key = cache.key(backbone="minilm", revision="sha256:abc", split="train")
    caplog.set_level(logging.INFO, logger="mycelium")
    assert cache.load(key) is None
    assert f"feature cache miss {key}" in caplog.text

    states = PrefixStates(
        hidden=torch.randn(10, 4).to(torch.bfloat16),
        offsets=torch.tensor([0, 3, 7]),
        lengths=torch.tensor([3, 4, 3]),
        first_trainable=20,
    )
    tensors = {**states.to_tensors(), "pooled": torch.randn(3, 4)}
    cache.save(key, tensors, {"n": 3, "dtype": torch.bfloat16, "split": "train"})
    assert key in cache and [p.name for p in cache.root.iterdir()] == [f"{key}.safetensors"]  # no temp left

    loaded, meta = cache.load(key)
    assert f"feature cache hit {key}" in caplog.text
    assert meta == {"n": 3, "dtype": "bfloat16", "split": "train"}
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    back = PrefixStates.from_tensors(loaded)
    assert back.first_trainable == 20
    assert torch.equal(back.batch([1], "right")[0][0], states.hidden[3:7])

    # A damaged entry is a miss, not a crash; get_or_compute rewrites it.
    cache.path(key).write_bytes(b"not a safetensors file")
    assert cache.load(key) is None
    got = cache.get_or_compute(key, lambda: {"x": torch.ones(2)})
    assert torch.equal(got["x"], torch.ones(2)) and torch.equal(cache.load(key)[0]["x"], torch.ones(2))


def test_cache_key_covers_every_part(monkeypatch, tmp_path):
    parts = dict(
        backbone="Qwen/Qwen2.5-0.5B-Instruct", revision="7ae557604adf67be50417f59c2c2f167def9a775",
        max_length=256, pooling="last", separator=" [SEP] ", data="sha256:0123", split="train",
        kind="prefix", first_trainable=20, dtype=torch.bfloat16,
    )
    base = FeatureCache.key(**parts)
    assert len(base) == 64 and base == FeatureCache.key(**dict(reversed(list(parts.items()))))
    changed = {
        "backbone": "minilm", "revision": "other", "max_length": 512, "pooling": "mean", "separator": " | ",
        "data": "sha256:4567", "split": "val", "kind": "pooled", "first_trainable": 24, "dtype": torch.float32,
    }
    keys = {base}
    for name, value in changed.items():
        keys.add(FeatureCache.key(**{**parts, name: value}))
    keys.add(FeatureCache.key(**parts, extra=None))
    assert len(keys) == len(changed) + 2

    monkeypatch.setenv("MYCELIUM_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c" / "features" and FeatureCache().root == default_cache_root()
    monkeypatch.delenv("MYCELIUM_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "mycelium" / "features"


def test_memory_budget():
    # C6-sized: 68k problems of ~120 tokens, Qwen2.5-0.5B width 896.
    tokens = 68_000 * 120
    assert prefix_bytes(tokens, 896, torch.float32) == tokens * 896 * 4
    assert prefix_bytes(tokens, 896, "bf16") == prefix_bytes(tokens, 896, torch.bfloat16) == tokens * 896 * 2
    assert fits(prefix_bytes(tokens, 896, "bfloat16"), 16) and not fits(prefix_bytes(tokens, 896, "float32"), 16)
    assert fits(1 << 30, 1) and not fits((1 << 30) + 1, 1)
    with pytest.raises(ValueError):
        prefix_bytes(1, 1, "float7")


def test_cached_compute(qwen, tmp_path, caplog):
    model, tok, _, ids = qwen
    cache = FeatureCache(tmp_path)
    parts = {"backbone": "tiny", "revision": "r1", "fingerprint": "f"}
    calls = []

    def pooled():
        calls.append("pooled")
        return compute_pooled(model, ids, pad_id=tok.pad_token_id, progress=False)

    def prefix():
        calls.append("prefix")
        return compute_prefix(model, ids, 2, pad_id=tok.pad_token_id, progress=False)

    caplog.set_level(logging.INFO, logger="mycelium")
    first = cached_compute(cache, ("pooled", "train"), parts, pooled)
    again = cached_compute(cache, ("pooled", "train"), parts, pooled)
    assert calls == ["pooled"] and torch.equal(first, again) and "feature cache hit" in caplog.text
    states = cached_compute(cache, ("prefix", "train", 2), parts, prefix)
    loaded = cached_compute(cache, ("prefix", "train", 2), parts, prefix)
    assert calls == ["pooled", "prefix"] and isinstance(loaded, PrefixStates) and loaded.first_trainable == 2
    assert torch.equal(loaded.hidden, states.hidden) and torch.equal(loaded.offsets, states.offsets)
    cached_compute(cache, ("pooled", "train"), {**parts, "revision": "r2"}, pooled)
    assert calls == ["pooled", "prefix", "pooled"]
    assert cached_compute(None, ("pooled", "val"), parts, lambda: torch.zeros(1)).shape == (1,)


def test_auto_cache_budget_is_half_the_available_ram():
    avail = available_ram_bytes()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < avail <= total
    # Two reads a moment apart differ by what other processes did meanwhile: allow 10%.
    assert auto_cache_budget_gb() == pytest.approx(avail / 2 / (1 << 30), rel=0.1)


def test_prefix_cache_obeys_the_memory_budget(tmp_path, monkeypatch, caplog):
    """``cache_memory_gb=0`` (auto) caches the prefix of an unfrozen attempt; a budget smaller than
    the states runs the full forward and says so; a negative one is refused by name."""
    from mycelium.config import ConfigError, config_from_args
    from mycelium.data.demo import write_demo_corpus
    from mycelium.train.attempts import Attempt
    from mycelium.train.prepare import prepare
    from mycelium.train.sources import Source

    write_demo_corpus(str(tmp_path / "data"), files=2, per_file=100, seed=3, tasks=("c6",), progress=False)
    monkeypatch.setenv("MYCELIUM_CACHE", str(tmp_path / "cache"))
    attempt = Attempt(1, "unfreeze2", 2, "clipped", "ce", "seed recipe")

    def source(budget: str) -> tuple[Source, object]:
        cfg = config_from_args(["--data", str(tmp_path / "data" / "c6"), "--backbone", "minilm", "--max-length", "32",
                                "--unfrozen-layers", "2", "--cache-memory-gb", budget, "--device", "cpu"], "c6")
        prep = prepare(cfg)
        return Source(prep, cfg, attempt), prep

    caplog.set_level(logging.INFO, logger="mycelium")
    src, prep = source("0")
    assert prep.cache_memory_gb == pytest.approx(auto_cache_budget_gb(), rel=0.2) and prep.cache_memory_gb > 0
    assert src.mode == "prefix" and src.train_x.first_trainable == len(transformer_blocks(prep.model.backbone)) - 2
    # The states of ~160 training rows: hundreds of KiB; 1e-6 GiB (~1 KiB) is too small for them.
    assert src.train_x.nbytes > 1e-6 * (1 << 30)
    caplog.clear()
    src, prep = source("1e-6")
    assert src.mode == "tokens"
    assert "it would exceed cache_memory_gb=1e-06" in caplog.text
    with pytest.raises(ConfigError, match="cache_memory_gb"):
        config_from_args(["--cache-memory-gb", "-1"], "c6").validate()
