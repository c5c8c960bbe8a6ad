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


def tune(y_true: np.ndarray, p_positive: np.ndarray) -> float:
    """The probability cut that maximises the positive class's F1 on ``(y_true, p_positive)``;
    0.5 when there is no positive example or no cut gives F1 above 0."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p_positive, dtype=np.float64)
    if not y.any():
        return 0.5
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    if f1[best] <= 0:
        return 0.5
    # Halfway to the next lower score: the same labels on validation, less tied to one example.
    lower = p[p < cuts[best]]
    return float((cuts[best] + lower.max()) / 2) if lower.size else float(cuts[best])


def resolve(setting: str, labels: Sequence[str], minority_label: str | None, y_val: np.ndarray,
            val_probs: np.ndarray) -> dict | None:
    """The manifest's threshold for ``-P threshold=setting``: tuned (``auto``), fixed (a number) or none."""
    if minority_label is None or setting == "none" or len(labels) != 2:
        return None
    pos = list(labels).index(minority_label)
    value = tune(np.asarray(y_val) == pos, val_probs[:, pos]) if setting == "auto" else float(setting)
    return {"label": minority_label, "value": value}


def predict(probs: np.ndarray, labels: Sequence[str], threshold: dict | None) -> np.ndarray:
    """Class indices for ``probs [N, k]``: the threshold's label where its probability reaches the
    threshold, else the other class; argmax without a threshold."""
    probs = np.asarray(probs)
    if threshold is None or len(labels) != 2 or not len(probs):
        return probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    pos = list(labels).index(threshold["label"])
    return np.where(probs[:, pos] >= threshold["value"], pos, 1 - pos)
