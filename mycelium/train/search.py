"""Head recipe search on cached features (``-P search=grid``).

A frozen attempt trains only the head on pooled features computed once, so an epoch costs a
fraction of a second: a small grid of class weights x loss x head learning rate can be trained in
full (same epochs, early stopping and decision threshold as a real attempt), scored on the
validation split, and the best recipe becomes the first registered attempt. Nothing here is
registered; the parent run gets one ``search`` child run with the table of every trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mycelium.model.classifier import param_groups
from mycelium.train.loop import (
    early_stop,
    evaluate,
    lr_schedule,
    objective,
    score_epoch,
    train_one_epoch,
)

if TYPE_CHECKING:
    from mycelium.config import TrainConfig
    from mycelium.train.prepare import Prepared
    from mycelium.train.sources import Source

WEIGHTS = ("none", "balanced", "sqrt_inv", "effective")
LOSSES = ("ce", "logit_adjusted", "focal")
LR_FACTORS = (1.0, 3.0)  # times -P lr_head


@dataclass(frozen=True)
class HeadRecipe:
    class_weights: str
    loss: str
    lr_head: float

    @property
    def name(self) -> str:
        return f"{self.class_weights}-{self.loss}-lr{self.lr_head:g}"


@dataclass
class Trial:
    recipe: HeadRecipe
    metric: float  # best healthy epoch's selection metric; -1 when every epoch collapsed
    epoch: int | None
    epochs_run: int


def grid(cfg: TrainConfig) -> list[HeadRecipe]:
    return [HeadRecipe(w, loss, cfg.lr_head * f) for w in WEIGHTS for loss in LOSSES for f in LR_FACTORS]


def search_heads(prep: Prepared, cfg: TrainConfig, source: Source, metric: str) -> list[Trial]:
    """Train a fresh head for every recipe of the grid on ``source``'s cached features."""
    model = prep.model
    steps_per_epoch = len(source.batches("train", None))
    trials = []
    for i, recipe in enumerate(grid(cfg)):
        torch.manual_seed(cfg.seed + 1)  # every trial starts from the same head a first attempt would
        model.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        loss_fn, _ = objective(prep, cfg, recipe.class_weights, recipe.loss)
        optimizer = torch.optim.AdamW(param_groups(model, recipe.lr_head, cfg.lr_backbone, cfg.weight_decay), fused=True)
        schedule = lr_schedule(optimizer, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler(prep.device.type, enabled=False)  # the head trains in fp32
        generator = torch.Generator().manual_seed(cfg.seed + 1000)
        epochs = []
        for epoch in range(1, cfg.epochs + 1):
            if early_stop(epochs, cfg.early_stopping, metric):
                break
            # On rank 0 alone (a world of one): a head on cached features is too small to share out.
            train_one_epoch(source, source.logits, source.batches("train", generator), prep.y_train, loss_fn, optimizer, scaler, schedule,
                            prep.autocast)
            probs, _ = evaluate(source, loss_fn, prep)
            epochs.append(score_epoch(epoch, probs, prep, cfg))
        healthy = [e for e in epochs if not e.report.collapsed]
        best = max(healthy, key=lambda e: (e.report.metrics[metric], -e.epoch)) if healthy else None
        trials.append(Trial(recipe, best.report.metrics[metric] if best else -1.0, best.epoch if best else None, len(epochs)))
    return trials


def best(trials: list[Trial]) -> Trial:
    """The winner on validation; ties go to the earlier (simpler) recipe in grid order."""
    return max(trials, key=lambda t: t.metric)
