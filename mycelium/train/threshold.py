"""The decision rule from class probabilities to a label, one for training and every consumer.

Binary tasks (C4, C5) label a row with the minority class when its probability reaches a
threshold tuned on the validation split for the selection metric (that class's F1); the
threshold travels in the checkpoint manifest as ``{"label": "BRIDGING", "value": 0.31}``, so
pyfunc, ``mycelium predict``, the Python API and the champion decision all label alike.
Probabilities are never changed. Without a threshold (C6, or ``-P threshold=none``) the label is
the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def tune(y_true: np.ndarray, p_positive: np.ndarray, collapse_dominance: float = 0.9) -> float:
    """The probability cut that maximises the positive class's F1 on ``(y_true, p_positive)``
    among cuts whose labels are not collapsed (``mycelium.metrics``' rule); 0.5 when no cut gives
    a healthy F1 above 0.

    Without the collapse rule a weak model's best F1 is often "everything positive" (F1
    2p / (1 + p) at positive share p): a cut that labels like that is never chosen. Written with
    cumulative sums rather than sklearn's precision_recall_curve, which does not give the
    predicted shares the rule needs at each cut.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p_positive, dtype=np.float64)
    n, positives = len(y), int(y.sum())
    if not positives or positives == n:
        return 0.5
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order], y[order]
    k = np.arange(1, n + 1)  # rows labelled positive when the cut is at scores[k - 1]
    tp = np.cumsum(hits)
    f1 = 2 * tp / (k + positives)
    q, share = k / n, positives / n  # predicted and true positive shares
    dominance = np.where(q >= 0.5, (q - share) / (1 - share), (share - q) / share).clip(min=0)
    at_run_end = np.r_[scores[1:] != scores[:-1], True]  # a cut cannot split equal scores
    ok = at_run_end & (tp > 0) & (k < n) & (dominance < collapse_dominance)
    if not ok.any():
        return 0.5
    best = int(np.flatnonzero(ok)[np.argmax(f1[ok])])
    # Halfway to the next lower score: the same labels on validation, less tied to one example.
    return float((scores[best] + scores[best + 1]) / 2)


def resolve(setting: str, labels: Sequence[str], minority_label: str | None, y_val: np.ndarray,
            val_probs: np.ndarray, collapse_dominance: float = 0.9) -> dict | None:
    """The manifest's threshold for ``-P threshold=setting``: tuned (``auto``), fixed (a number) or none."""
    if minority_label is None or setting == "none" or len(labels) != 2:
        return None
    pos = list(labels).index(minority_label)
    value = tune(np.asarray(y_val) == pos, val_probs[:, pos], collapse_dominance) if setting == "auto" else float(setting)
    return {"label": minority_label, "value": value}


def predict(probs: np.ndarray, labels: Sequence[str], threshold: dict | None) -> np.ndarray:
    """Class indices for ``probs [N, k]``: the threshold's label where its probability reaches the
    threshold, else the other class; argmax without a threshold."""
    probs = np.asarray(probs)
    if threshold is None or len(labels) != 2 or not len(probs):
        return probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    pos = list(labels).index(threshold["label"])
    return np.where(probs[:, pos] >= threshold["value"], pos, 1 - pos)
