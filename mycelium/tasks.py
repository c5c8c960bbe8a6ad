"""The one table of task differences: the seed's recipe for C4, C5 and C6.

Everything that differs between the three classifiers lives here; the data loader, trainer,
tracking and serving code read a ``TaskSpec`` and never branch on the task name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


CHAMPION = "champion"  # the registry alias a service loads; moved only by the champion decision


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    # Record fields fed to the model by default, in order; several fields are joined with
    # `separator`. `-P inputs=...` picks another composition (the seed's is `seed_inputs`).
    input_fields: tuple[str, ...]
    # The seed's input composition (its recipe, and the baseline of every quality table).
    seed_inputs: tuple[str, ...]
    # Input fields that may legitimately be "" (C4: no earlier step before the first one).
    allow_empty: tuple[str, ...]
    # Fixed label set, or () for an open set read from the data (C6).
    labels: tuple[str, ...]
    # Class whose F1 selects checkpoints ("minority" F1 for C4/C5); None -> macro F1.
    minority_label: str | None
    selection_metric: str  # "minority_f1" | "macro_f1"
    data_prefix: str
    registered_model: str
    # Training recipe defaults (all overridable from MLproject parameters).
    unfrozen_layers: int
    class_weights: str  # none | balanced | clipped | sqrt_inv | explicit
    weight_clip: float
    loss: str  # ce | focal
    focal_gamma: float
    lr_head: float
    lr_backbone: float
    # Binary decision rule: "auto" = a threshold tuned on validation, "none" = argmax (quality benchmark).
    threshold: str = "none"
    epochs: int = 5
    separator: str = " [SEP] "
    # Fields that only give context: truncation cuts them first and keeps the other fields whole.
    context_fields: tuple[str, ...] = ("problem",)
    # "keep": numbers as written (the seed's); "symbols": each value mapped to N1, N2, ... per record.
    numbers: str = "keep"
    # What to try, in order, when the first attempt is not good enough (see trainer.fallbacks).
    # "unfreeze": last 4 blocks trainable at lr 2e-5 when below fallback_threshold;
    # "sqrt_inv" / "focal": collapse remedies for C6.
    fallbacks: tuple[str, ...] = field(default_factory=tuple)


TASKS: dict[str, TaskSpec] = {
    "c4": TaskSpec(
        name="c4",
        description="bridging detector: is an implicit operation needed between step_i and step_j?",
        input_fields=("step_i", "step_j"),
        seed_inputs=("step_i", "step_j"),
        allow_empty=("step_i",),
        # The rule behind the label looks at the problem text and every earlier result.
        context_fields=("problem", "earlier_steps"),
        labels=("NOT_BRIDGING", "BRIDGING"),
        minority_label="BRIDGING",
        selection_metric="minority_f1",
        data_prefix="s3://mycelium-data/c4/",
        registered_model="mycelium-c4",
        unfrozen_layers=0,
        class_weights="balanced",  # BRIDGING ~19x at 2.6%
        weight_clip=5.0,
        loss="ce",
        focal_gamma=2.0,
        lr_head=1e-3,
        lr_backbone=2e-5,
        fallbacks=("unfreeze",),
    ),
    "c5": TaskSpec(
        name="c5",
        description="dependency resolver: does step_i's result feed into step_j?",
        input_fields=("step_i", "step_j"),
        seed_inputs=("step_i", "step_j"),
        allow_empty=(),
        labels=("INDEPENDENT", "DEPENDS"),
        minority_label="DEPENDS",
        selection_metric="minority_f1",
        data_prefix="s3://mycelium-data/c5/",
        registered_model="mycelium-c5",
        # Number mapping: test DEPENDS F1 0.815 vs 0.671 as written (quality bench, unseen templates).
        numbers="symbols",
        unfrozen_layers=0,
        class_weights="balanced",  # from the measured distribution
        weight_clip=5.0,
        loss="ce",
        focal_gamma=2.0,
        lr_head=1e-3,
        lr_backbone=2e-5,
        fallbacks=("unfreeze",),
    ),
    "c6": TaskSpec(
        name="c6",
        description="answer type: what format must the final answer take?",
        input_fields=("problem",),
        seed_inputs=("problem",),
        allow_empty=(),
        context_fields=(),  # the problem is C6's whole input, not context
        labels=(),  # open set: INTEGER, FRACTION, RADICAL, SET, EXPRESSION, ... from the data
        minority_label=None,
        selection_metric="macro_f1",
        data_prefix="s3://mycelium-data/c6/",
        registered_model="mycelium-c6",
        unfrozen_layers=4,
        # Logit-adjusted CE instead of the seed's clipped weights: test macro F1 +0.062/-0.027/+0.062 on
        # three data seeds (quality bench, unseen generators); `-P class_weights=clipped -P loss=ce` is the seed's.
        class_weights="none",
        weight_clip=5.0,
        loss="logit_adjusted",
        focal_gamma=2.0,
        lr_head=1e-3,
        lr_backbone=2e-5,
        fallbacks=("sqrt_inv", "focal"),
    ),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}") from None
