"""Class weight schemes and losses (the seed's C4 ~19x, C6 5x clip, sqrt_inv and focal remedies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mycelium.train.losses import FocalLoss, class_weights, make_loss


def c4_labels(n: int = 10_000, minority_share: float = 0.026) -> list[int]:
    # 0 = NOT_BRIDGING, 1 = BRIDGING, in the seed's proportions.
    n_min = round(n * minority_share)
    return [0] * (n - n_min) + [1] * n_min


def test_balanced_gives_bridging_about_19x():
    w = class_weights(c4_labels(), 2, "balanced")
    # n / (k * count) = 10000 / (2 * 260) = 19.23: the seed's "BRIDGING up-weighted ~19x".
    assert w[1] == pytest.approx(10_000 / (2 * 260))
    assert w[1] == pytest.approx(19.2, abs=0.05)
    assert w[0] == pytest.approx(10_000 / (2 * 9740))


def test_none_is_all_ones():
    assert class_weights(c4_labels(), 2, "none").tolist() == [1.0, 1.0]


def test_clipped_caps_at_clip_times_smallest():
    # C6-like: INTEGER dominant, RADICAL rare.
    counts = [700, 150, 100, 40, 10]
    y = [i for i, c in enumerate(counts) for _ in range(c)]
    balanced = class_weights(y, 5, "balanced")
    w = class_weights(y, 5, "clipped", clip=5.0)
    assert w.min() == pytest.approx(balanced.min())
    assert w.max() == pytest.approx(5.0 * w.min())
    assert np.all(w <= 5.0 * w.min() + 1e-12)
    # Classes under the cap keep their balanced weight.
    under = balanced <= 5.0 * balanced.min()
    np.testing.assert_allclose(w[under], balanced[under])
    assert under.sum() < 5  # the cap did bite


def test_sqrt_inv_values():
    y = c4_labels()
    w = class_weights(y, 2, "sqrt_inv")
    np.testing.assert_allclose(w, np.sqrt(class_weights(y, 2, "balanced")))
    assert w[1] == pytest.approx(np.sqrt(10_000 / (2 * 260)))  # ~4.39
    # Proportional to sqrt(1 / frequency).
    freq = np.array([0.974, 0.026])
    assert w[1] / w[0] == pytest.approx(np.sqrt(freq[0] / freq[1]))


def test_explicit_is_length_checked():
    assert class_weights([0, 1], 2, "explicit", explicit=[1.0, 19.0]).tolist() == [1.0, 19.0]
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        class_weights([0, 1], 2, "explicit", explicit=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs a list"):
        class_weights([0, 1], 2, "explicit")


def test_zero_count_class_is_named():
    y = [0, 0, 2, 2]
    with pytest.raises(ValueError, match="RADICAL"):
        class_weights(y, 3, "balanced", label_names=["INTEGER", "RADICAL", "SET"])
    for scheme in ("clipped", "sqrt_inv"):
        with pytest.raises(ValueError, match="no training examples"):
            class_weights(y, 3, scheme)


def test_bad_scheme_lists_choices():
    with pytest.raises(ValueError, match="balanced, clipped, sqrt_inv"):
        class_weights([0, 1], 2, "inverse")


def test_focal_gamma0_equals_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g) * 3
    target = torch.randint(0, 5, (64,), generator=g)
    weight = torch.tensor([0.3, 1.0, 2.5, 5.0, 0.7])
    expected = F.cross_entropy(logits, target, weight=weight)
    assert torch.equal(FocalLoss(weight, gamma=0.0)(logits, target), expected)
    assert torch.equal(FocalLoss(None, gamma=0.0)(logits, target), F.cross_entropy(logits, target))


def test_focal_gamma2_downweights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.5, 0.0]])  # first: confident and right; second: unsure
    target = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    fl = FocalLoss(None, gamma=2.0, reduction="none")(logits, target)
    assert torch.all(fl < ce)
    assert (fl[0] / ce[0]) < (fl[1] / ce[1])
    # Hand-computed: -(1 - p)^2 log p.
    p = torch.softmax(logits, -1)[:, 0]
    torch.testing.assert_close(fl, -((1 - p) ** 2) * torch.log(p))


def test_focal_gradients_flow():
    logits = torch.randn(8, 3, requires_grad=True)
    FocalLoss(torch.tensor([1.0, 2.0, 3.0]), gamma=2.0)(logits, torch.randint(0, 3, (8,))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_make_loss():
    w = torch.tensor([1.0, 19.2])
    ce = make_loss("ce", w, 2.0)
    assert isinstance(ce, torch.nn.CrossEntropyLoss)
    fl = make_loss("focal", w, 2.0)
    assert isinstance(fl, FocalLoss) and fl.gamma == 2.0
    torch.testing.assert_close(fl.weight, w)
    with pytest.raises(ValueError, match="ce, focal"):
        make_loss("hinge", w, 2.0)
