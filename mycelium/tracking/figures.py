"""Figures for MLflow: class distribution, confusion matrix, and collapse attempts side by side.

Every function returns a ``matplotlib.figure.Figure`` for ``mlflow.log_figure`` and never calls
``pyplot.show``; they render with Agg, so they work without a display. Figures are built
with ``Figure`` directly (not ``pyplot``) so nothing accumulates in pyplot's global state over
a long training run; callers need not close them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mycelium.metrics import metric_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    # matplotlib is imported on first use: it costs ~2 s of start-up on a small CPU, paid only by
    # the processes that draw. A bare Figure renders through Agg without selecting a backend.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _labels_of(counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    seen: dict[str, None] = {}
    for per_label in counts.values():
        for label in per_label:
            seen.setdefault(label, None)
    return list(seen)


def class_distribution_figure(
    counts: Mapping[str, Mapping[str, int]],
    log_scale: bool | None = None,
    title: str = "Class distribution",
) -> Figure:
    """Grouped bars: one group per label, one bar per split (``{"train": {"BRIDGING": 12, ...}, ...}``).

    ``log_scale=None`` switches to a log axis when the largest class is over 20x the smallest
    non-empty one (C4's 97.4/2.6 split would otherwise show the minority as a sliver). Bars are
    annotated with the count and the share of the split.
    """
    labels = _labels_of(counts)
    splits = list(counts)
    values = np.array([[counts[s].get(label, 0) for label in labels] for s in splits], dtype=float)
    nonzero = values[values > 0]
    if log_scale is None:
        log_scale = bool(nonzero.size and nonzero.max() / nonzero.min() > 20)

    fig = _figure(figsize=(max(6.0, 1.2 * len(labels) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        total = values[i].sum() or 1.0
        offset = (i - (len(splits) - 1) / 2) * width
        bars = ax.bar(x + offset, values[i], width, label=f"{split} (n={int(values[i].sum())})")
        for bar, v in zip(bars, values[i]):
            if v > 0:
                ax.annotate(f"{int(v)}\n{100 * v / total:.1f}%", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel("examples" + (" (log scale)" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    ax.margins(y=0.2)
    ax.set_title(title)
    ax.legend()
    return fig


def confusion_matrix_figure(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], title: str = "Confusion matrix"
) -> Figure:
    """Rows = true, columns = predicted. Colour is the row-normalised share (recall on the
    diagonal), so a minority class's row is as visible as the majority's; each cell shows its count
    and that share. No colour bar: the cells already say the share, and it would double the drawing
    time (the tracking thread draws one per epoch while training runs)."""
    cm = np.asarray(confusion, dtype=float)
    k = len(labels)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {k} labels")
    row_sums = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)

    size = max(4.0, 0.7 * k + 2.5)
    fig = _figure(figsize=(size, size), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (colour: share of the row)")
    ax.set_title(title)
    return fig


def _metrics_of(report: object) -> Mapping[str, float]:
    # Accepts an EpochReport, its to_dict(), or a flat metrics dict.
    if hasattr(report, "metrics"):
        return report.metrics  # type: ignore[attr-defined]
    if isinstance(report, Mapping) and isinstance(report.get("metrics"), Mapping):
        return report["metrics"]
    if isinstance(report, Mapping):
        return report
    raise TypeError(f"cannot read metrics from {type(report).__name__}")


def attempts_figure(
    attempts: Mapping[str, object], labels: Sequence[str], title: str = "Attempts side by side"
) -> Figure:
    """Two panels over attempts (e.g. ``{"clipped": report, "sqrt_inv": report, "focal": report}``):
    per-class F1 per attempt, and the predicted-class distribution per attempt next to the true
    distribution. A collapsed attempt shows as one tall predicted bar and F1 ~0 elsewhere.

    Each attempt is an ``EpochReport``, its ``to_dict()``, or a flat metrics dict with
    ``f1_X``, ``pred_share_X`` and ``true_share_X`` keys.
    """
    names = list(attempts)
    metrics = [_metrics_of(attempts[n]) for n in names]
    labels = list(labels)
    k = len(labels)
    x = np.arange(k)

    fig = _figure(figsize=(max(8.0, 1.1 * k + 4), 7.5), layout="constrained")
    ax_f1, ax_share = fig.subplots(2, 1, sharex=True)

    width = 0.8 / max(1, len(names))
    for i, (name, m) in enumerate(zip(names, metrics)):
        f1 = [m.get(metric_key("f1", label), 0.0) for label in labels]
        flag = " [collapsed]" if m.get("collapsed", 0.0) >= 0.5 else ""
        macro = m.get("macro_f1")
        tag = f"{name} (macro F1 {macro:.2f}){flag}" if macro is not None else f"{name}{flag}"
        ax_f1.bar(x + (i - (len(names) - 1) / 2) * width, f1, width, label=tag)
    ax_f1.set_ylim(0, 1.05)
    ax_f1.set_ylabel("F1 per class")
    ax_f1.legend(fontsize=8)
    ax_f1.set_title(title)

    # The true distribution comes from the first attempt that has it (all share validation data).
    true = next(([m.get(metric_key("true_share", label), 0.0) for label in labels]
                 for m in metrics if any(metric_key("true_share", label) in m for label in labels)), None)
    width = 0.8 / max(1, len(names) + (true is not None))
    offset = 0
    if true is not None:
        ax_share.bar(x - 0.4 + width / 2, true, width, color="black", alpha=0.35, hatch="//", label="true")
        offset = 1
    for i, (name, m) in enumerate(zip(names, metrics)):
        share = [m.get(metric_key("pred_share", label), 0.0) for label in labels]
        ax_share.bar(x - 0.4 + width / 2 + (i + offset) * width, share, width, label=name)
    ax_share.set_ylim(0, 1.05)
    ax_share.set_ylabel("share of predictions")
    ax_share.set_xticks(x, labels, rotation=30 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax_share.legend(fontsize=8)
    return fig
