"""Attempts: one training recipe each, their results, and the fallback ladder that adds the next."""

from __future__ import annotations

from dataclasses import dataclass

from mycelium.config import TrainConfig
from mycelium.train.loop import EpochResult

UNFREEZE_BLOCKS = 4  # the ladder's unfreeze fallback trains the last 4 blocks (the seed's C6 depth)


@dataclass(frozen=True)
class Attempt:
    """One training recipe; fallbacks are attempts that change one thing."""

    index: int
    name: str
    unfrozen_layers: int
    class_weights: str
    loss: str
    changed: str  # what differs from the previous attempt, for the run name and tags
    lr_head: float | None = None  # None: -P lr_head (the head recipe search may choose another)


@dataclass
class AttemptResult:
    attempt: Attempt
    run_id: str
    epochs: list[EpochResult]

    def best(self, metric: str) -> EpochResult | None:
        healthy = [e for e in self.epochs if not e.report.collapsed]
        return max(healthy, key=lambda e: (e.report.metrics[metric], -e.epoch)) if healthy else None



def next_attempt(step: str, results: list[AttemptResult], cfg: TrainConfig, n_blocks: int) -> Attempt | None:
    """The fallback ladder: which attempt (if any) a step adds after the results so far."""
    metric = cfg.spec.selection_metric
    last = results[-1].attempt
    best = [r.best(metric) for r in results]
    best_value = max((b.report.metrics[metric] for b in best if b), default=0.0)
    collapsed = results[-1].best(metric) is None
    idx = last.index + 1
    if step == "unfreeze":
        if last.unfrozen_layers > 0 or (best_value >= cfg.fallback_threshold and not cfg.force_fallbacks):
            return None
        k = min(UNFREEZE_BLOCKS, n_blocks)
        return Attempt(idx, f"unfreeze{k}", k, last.class_weights, last.loss, f"last {k} blocks unfrozen (lr {cfg.lr_backbone:g})", last.lr_head)
    if step == "sqrt_inv":
        if not (collapsed or cfg.force_fallbacks):
            return None
        return Attempt(idx, "sqrt_inv", last.unfrozen_layers, "sqrt_inv", last.loss, "sqrt(inverse frequency) class weights", last.lr_head)
    if step == "focal":
        if not (collapsed or cfg.force_fallbacks):
            return None
        return Attempt(idx, f"focal{cfg.focal_gamma:g}", last.unfrozen_layers, last.class_weights, "focal", f"focal loss (gamma {cfg.focal_gamma:g})", last.lr_head)
    raise ValueError(step)


def first_name(cfg: TrainConfig) -> str:
    frozen = "frozen" if cfg.unfrozen_layers == 0 else f"unfreeze{cfg.unfrozen_layers}"
    return f"{frozen}-{cfg.class_weights}-{cfg.loss}"


def best_of_attempts(results: list[AttemptResult], metric: str) -> tuple[AttemptResult, EpochResult] | None:
    best = [(r, r.best(metric)) for r in results]
    best = [(r, e) for r, e in best if e is not None]
    return max(best, key=lambda re: re[1].report.metrics[metric]) if best else None

