"""Metrics and collapse indicators on hand-built predictions, and the figures built from them."""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

from mycelium.metrics import EpochReport, evaluate_predictions, metric_key, metric_name
from mycelium.tracking.figures import (
    attempts_figure,
    class_distribution_figure,
    confusion_matrix_figure,
)

C6 = ["INTEGER", "FRACTION", "RADICAL", "SET", "EXPRESSION"]
C4 = ["NOT_BRIDGING", "BRIDGING"]


def c6_truth() -> list[int]:
    # 60 INTEGER, 20 FRACTION, 10 RADICAL, 10 SET; no EXPRESSION in this validation set.
    return [0] * 60 + [1] * 20 + [2] * 10 + [3] * 10


def test_all_integer_collapse_is_flagged():
    y = c6_truth()
    r = evaluate_predictions(y, [0] * len(y), C6)
    assert r.collapsed and r.metrics["collapsed"] == 1.0
    assert r.top_pred_class == "INTEGER"
    assert r.metrics["top_pred_share"] == 1.0
    assert r.metrics["top_pred_true_share"] == pytest.approx(0.6)
    assert r.metrics["dominance"] == pytest.approx(1.0)
    assert r.metrics["accuracy"] == pytest.approx(0.6)  # accuracy alone looks fine
    assert r.zero_recall == ["FRACTION", "RADICAL", "SET"]
    assert r.never_predicted == ["FRACTION", "RADICAL", "SET", "EXPRESSION"]
    assert r.metrics["n_zero_recall"] == 3.0 and r.metrics["n_never_predicted"] == 4.0


def test_radical_only_collapse_is_flagged():
    y = c6_truth()
    r = evaluate_predictions(y, [2] * len(y), C6)
    assert r.collapsed
    assert r.top_pred_class == "RADICAL"
    assert r.metrics["dominance"] == pytest.approx(1.0)
    assert r.metrics["recall_RADICAL"] == 1.0
    assert r.zero_recall == ["INTEGER", "FRACTION", "SET"]


def test_near_collapse_by_dominance():
    # 95% INTEGER predictions where 60% are INTEGER: dominance (0.95-0.6)/0.4 = 0.875 < 0.9.
    y = c6_truth()
    pred = [0] * 95 + [1] * 5
    r = evaluate_predictions(y, pred, C6)
    assert r.metrics["dominance"] == pytest.approx(0.875)
    assert not r.collapsed
    assert evaluate_predictions(y, pred, C6, collapse_dominance=0.85).collapsed


def test_healthy_imbalanced_c4_is_not_collapsed():
    # 1000 pairs, 26 BRIDGING (2.6%); the model predicts ~97% NOT_BRIDGING because that is the truth.
    y = [0] * 974 + [1] * 26
    pred = [0] * 964 + [1] * 10 + [1] * 20 + [0] * 6  # 10 false alarms, 20 of 26 bridging found
    r = evaluate_predictions(y, pred, C4, minority_label="BRIDGING")
    assert not r.collapsed
    assert r.top_pred_class == "NOT_BRIDGING"
    assert r.metrics["top_pred_share"] == pytest.approx(0.970)
    assert r.metrics["dominance"] == 0.0  # predicted slightly less often than it occurs: clipped at 0
    assert r.metrics["minority_f1"] == pytest.approx(2 * 20 / (2 * 20 + 10 + 6))
    assert r.metrics["f1_BRIDGING"] == r.metrics["minority_f1"]
    assert r.zero_recall == [] and r.never_predicted == []


def test_c4_all_majority_is_collapsed():
    y = [0] * 974 + [1] * 26
    r = evaluate_predictions(y, [0] * 1000, C4, minority_label="BRIDGING")
    assert r.collapsed
    assert r.metrics["accuracy"] == pytest.approx(0.974)
    assert r.metrics["minority_f1"] == 0.0
    assert r.zero_recall == ["BRIDGING"]


def test_single_class_truth_is_not_collapse():
    r = evaluate_predictions([1, 1, 1], [1, 1, 1], C4)
    assert r.metrics["dominance"] == 0.0
    assert not r.collapsed


def test_confusion_matrix_has_every_label():
    y = c6_truth()
    pred = list(y)
    pred[0] = 3  # one INTEGER predicted as SET
    r = evaluate_predictions(y, pred, C6)
    assert len(r.confusion) == 5 and all(len(row) == 5 for row in r.confusion)
    assert r.confusion[0][0] == 59 and r.confusion[0][3] == 1
    assert r.confusion[4] == [0, 0, 0, 0, 0]  # EXPRESSION: absent from truth and predictions
    assert [row[4] for row in r.confusion] == [0] * 5
    assert r.metrics["support_EXPRESSION"] == 0.0
    assert r.never_predicted == ["EXPRESSION"]
    assert r.zero_recall == []  # EXPRESSION has no support, so it is not a zero-recall class
    # Macro F1 skips a class absent from truth and predictions (sklearn's f1_score default).
    from sklearn.metrics import f1_score

    assert r.metrics["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))


def test_shares_and_minority_omitted_without_label():
    r = evaluate_predictions(["INTEGER", "SET", "SET", "INTEGER"], ["INTEGER", "SET", "INTEGER", "INTEGER"], C6)
    assert r.metrics["pred_share_INTEGER"] == 0.75 and r.metrics["true_share_INTEGER"] == 0.5
    assert sum(r.metrics[metric_key("pred_share", x)] for x in C6) == pytest.approx(1.0)
    assert "minority_f1" not in r.metrics


def test_metric_names_are_mlflow_safe_and_json_roundtrips():
    labels = ["SET/TUPLE", "EXPRESSION WITH VARS", "a+b"]
    r = evaluate_predictions([0, 1, 2, 2], [0, 1, 1, 2], labels)
    assert metric_name("EXPRESSION WITH VARS") == "EXPRESSION_WITH_VARS"
    for k, v in r.metrics.items():
        assert all(c.isalnum() or c in "_-./" for c in k), k
        assert isinstance(v, float)
    assert "f1_SET/TUPLE" in r.metrics and "f1_a_b" in r.metrics
    back = EpochReport.from_json(r.to_json())
    assert back == r
    assert json.loads(r.to_json())["labels"] == labels
    assert r.prefixed("val_")["val_accuracy"] == r.metrics["accuracy"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        evaluate_predictions([0, 5], [0, 1], C4)
    with pytest.raises(ValueError, match="not in"):
        evaluate_predictions(["MAYBE"], ["BRIDGING"], C4)
    with pytest.raises(ValueError, match="minority"):
        evaluate_predictions([0], [0], C4, minority_label="DEPENDS")


def test_figures_render():
    y = c6_truth()
    attempts = {
        "clipped": evaluate_predictions(y, [0] * 100, C6),
        "sqrt_inv": evaluate_predictions(y, [2] * 100, C6).to_dict(),
        "focal": evaluate_predictions(y, y, C6).metrics,
    }
    figs = [
        class_distribution_figure(
            {"train": {"NOT_BRIDGING": 9740, "BRIDGING": 260}, "val": {"NOT_BRIDGING": 974, "BRIDGING": 26}}
        ),
        confusion_matrix_figure(attempts["clipped"].confusion, C6, "epoch 1"),
        attempts_figure(attempts, C6),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        fig.canvas.draw()  # renders on Agg without a display
    assert figs[0].axes[0].get_yscale() == "log"  # 37x imbalance switches to a log axis
    with pytest.raises(ValueError):
        confusion_matrix_figure([[1, 0], [0, 1]], C6)
