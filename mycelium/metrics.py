"""Validation metrics and collapse indicators for one epoch.

``evaluate_predictions`` turns true and predicted class indices into an ``EpochReport``: a flat
dict of floats for ``mlflow.log_metrics`` plus the structured parts (confusion matrix, class
lists) that go into JSON artifacts and figures.

Flat metric names (``X`` is a label, sanitised for MLflow: characters other than letters,
digits and ``_ - . /`` become ``_``):

- ``accuracy``, ``balanced_accuracy`` (mean recall over classes with validation support),
  ``macro_f1`` (unweighted mean F1 over the labels present in the true or the predicted labels,
  which is sklearn's ``f1_score(average="macro")``), ``weighted_f1``,
  ``minority_f1`` (F1 of the task's minority label; absent when the task has none, e.g. C6);
- ``precision_X``, ``recall_X``, ``f1_X``, ``support_X`` for every label;
- ``pred_share_X`` (share of predictions that are X) and ``true_share_X`` (share of validation
  examples that are X);
- the collapse indicators below, ``n_predicted_classes`` and ``n_samples``.

Collapse indicators. A model has collapsed when it predicts one class far more often than that
class occurs:

- ``top_pred_class``: the most-predicted class; ``top_pred_share``: the share of predictions it gets;
- ``top_pred_true_share``: that class's share among the validation labels;
- ``dominance = (top_pred_share - top_pred_true_share) / (1 - top_pred_true_share)``, clipped
  below at 0, and 0 when the true share is 1. It is the fraction of the room above the true
  share that the top class takes: 0 when the model predicts the top class exactly as often as
  it occurs, 1 when it predicts nothing else;
- ``never_predicted``: labels that no validation example is predicted as;
  ``zero_recall``: labels with validation support whose recall is 0;
- ``collapsed`` is true when only one class is predicted while at least two classes have
  validation support, when ``dominance >= collapse_dominance`` (default 0.9), or, for a task with
  a minority label (C4, C5), when that label has validation support and zero recall: a model that
  never correctly predicts the class its selection metric is about has learnt nothing useful,
  whatever its prediction shares (plain CE at 2.6% BRIDGING predicts BRIDGING for 0.3% of rows,
  all wrong: dominance stays under 0.9, minority F1 is 0). ``collapse_reasons`` says which rule fired.

So a healthy C4 model that predicts ~97% NOT_BRIDGING, because ~97% of the pairs are
NOT_BRIDGING, has dominance ~0 and is not collapsed, while the seed's C6 failures, "INTEGER for
everything" and "RADICAL only", both have dominance 1 and are flagged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./]")


def metric_name(name: str) -> str:
    """A label or metric name made safe for MLflow (letters, digits, ``_ - . /``)."""
    return _UNSAFE.sub("_", str(name))


def metric_key(prefix: str, label: str) -> str:
    """The flat key of a per-class metric, e.g. ``metric_key("f1", "BRIDGING") == "f1_BRIDGING"``."""
    return f"{prefix}_{metric_name(label)}"


@dataclass
class EpochReport:
    """One evaluation: flat float metrics plus the structured parts that do not fit in them."""

    metrics: dict[str, float]
    confusion: list[list[int]]  # rows = true label, cols = predicted label, in `labels` order
    labels: list[str]
    never_predicted: list[str] = field(default_factory=list)
    zero_recall: list[str] = field(default_factory=list)
    collapsed: bool = False
    top_pred_class: str | None = None
    collapse_reasons: list[str] = field(default_factory=list)

    def prefixed(self, prefix: str) -> dict[str, float]:
        """Metrics with a prefix for logging, e.g. ``report.prefixed("val_")``."""
        return {f"{prefix}{k}": v for k, v in self.metrics.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> EpochReport:
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> EpochReport:
        return cls.from_dict(json.loads(s))


def _as_indices(y: Sequence, labels: Sequence[str], what: str) -> np.ndarray:
    """Class indices from indices (list, numpy array or torch tensor) or label strings."""
    if hasattr(y, "detach"):  # a torch tensor, possibly on an accelerator
        y = y.detach().cpu().numpy()
    arr = np.asarray(y if isinstance(y, np.ndarray) else list(y))
    if arr.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted({str(v) for v in arr if v not in index})
        if unknown:
            raise ValueError(f"{what} holds labels not in {list(labels)}: {unknown}")
        return np.array([index[v] for v in arr], dtype=np.int64)
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= len(labels)):
        raise ValueError(f"{what} holds class indices outside 0..{len(labels) - 1}")
    return arr


def evaluate_predictions(
    y_true: Sequence[int] | Sequence[str],
    y_pred: Sequence[int] | Sequence[str],
    labels: Sequence[str],
    minority_label: str | None = None,
    collapse_dominance: float = 0.9,
) -> EpochReport:
    """Metrics, confusion matrix and collapse indicators for one set of predictions.

    ``y_true`` / ``y_pred`` are class indices into ``labels`` (label strings are accepted too).
    Every label gets its per-class metrics and a row/column in the confusion matrix, even when
    absent from both. See the module docstring for the definitions.
    """
    labels = [str(x) for x in labels]
    k = len(labels)
    if k < 1:
        raise ValueError("labels is empty")
    yt = _as_indices(y_true, labels, "y_true")
    yp = _as_indices(y_pred, labels, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} items, y_pred {yp.size}")
    n = int(yt.size)
    if n == 0:
        raise ValueError("no predictions to evaluate")
    if minority_label is not None and minority_label not in labels:
        raise ValueError(f"minority label {minority_label!r} is not one of {labels}")

    # Imported here: the figure helper process reads this module's metric names without paying for sklearn.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    idx = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        yt, yp, labels=idx, average=None, zero_division=0
    )
    cm = confusion_matrix(yt, yp, labels=idx)
    true_counts = np.bincount(yt, minlength=k)
    pred_counts = np.bincount(yp, minlength=k)
    true_share = true_counts / n
    pred_share = pred_counts / n

    # Macro over labels seen in truth or predictions (sklearn's default label set): a class the
    # validation data lacks only counts against the model if the model predicts it.
    present = (true_counts > 0) | (pred_counts > 0)
    macro_f1 = float(f1[present].mean())
    weighted_f1 = float((f1 * true_counts).sum() / n)
    supported = true_counts > 0
    balanced_accuracy = float(recall[supported].mean())

    # First-most-predicted class in label order on ties.
    top = int(np.argmax(pred_counts))
    top_share = float(pred_share[top])
    top_true = float(true_share[top])
    dominance = 0.0 if top_true >= 1.0 else max(0.0, (top_share - top_true) / (1.0 - top_true))
    never_predicted = [labels[i] for i in idx if pred_counts[i] == 0]
    zero_recall = [labels[i] for i in idx if supported[i] and recall[i] == 0]
    n_predicted = int((pred_counts > 0).sum())
    reasons = []
    if n_predicted == 1 and int(supported.sum()) >= 2:
        reasons.append(f"only {labels[top]} predicted")
    if dominance >= collapse_dominance:
        reasons.append(f"dominance {dominance:.2f} >= {collapse_dominance:g}")
    if minority_label is not None and minority_label in zero_recall:
        reasons.append(f"{minority_label} never correctly predicted")
    collapsed = bool(reasons)

    m: dict[str, float] = {
        "accuracy": float((yt == yp).mean()),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
    }
    if minority_label is not None:
        m["minority_f1"] = float(f1[labels.index(minority_label)])
    for i, name in enumerate(labels):
        m[metric_key("precision", name)] = float(precision[i])
        m[metric_key("recall", name)] = float(recall[i])
        m[metric_key("f1", name)] = float(f1[i])
        m[metric_key("support", name)] = float(support[i])
    for i, name in enumerate(labels):
        m[metric_key("pred_share", name)] = float(pred_share[i])
        m[metric_key("true_share", name)] = float(true_share[i])
    m.update(
        {
            "top_pred_share": top_share,
            "top_pred_true_share": top_true,
            "dominance": float(dominance),
            "n_never_predicted": float(len(never_predicted)),
            "n_zero_recall": float(len(zero_recall)),
            "n_predicted_classes": float(n_predicted),
            "collapsed": float(collapsed),
            "n_samples": float(n),
        }
    )
    return EpochReport(
        metrics=m,
        confusion=cm.astype(int).tolist(),
        labels=labels,
        never_predicted=never_predicted,
        zero_recall=zero_recall,
        collapsed=collapsed,
        top_pred_class=labels[top],
        collapse_reasons=reasons,
    )
