"""One epoch and its evaluation: torch only, no MLflow.

``train_one_epoch`` is where the loss is computed and the optimizer steps; ``evaluate`` gives the
validation probabilities; ``score_epoch`` turns them into the epoch's report by its decision
rule (a tuned threshold for binary tasks, else argmax). ``mycelium.train`` (registered attempts)
and ``mycelium.search`` (the head recipe search on cached features) share them.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mycelium.cache.passes import for_each_batch
from mycelium.distributed import SOLO, World
from mycelium.metrics import EpochReport, evaluate_predictions
from mycelium.train.threshold import predict as decide_labels
from mycelium.train.threshold import resolve as resolve_threshold

if TYPE_CHECKING:
    from mycelium.config import TrainConfig
    from mycelium.train.prepare import Prepared
    from mycelium.train.sources import Source


@dataclass
class EpochResult:
    epoch: int
    report: EpochReport  # by the epoch's decision rule (tuned threshold or argmax): what selects and promotes
    train_loss: float
    val_loss: float
    version: str | None
    probs: np.ndarray = field(repr=False)
    threshold: dict | None = None  # the binary decision threshold (mycelium.train.threshold); None = argmax
    argmax: dict[str, float] = field(default_factory=dict)  # argmax metrics beside a threshold's, for the log


def train_one_epoch(source: Source, forward: Callable[[str, list[int]], torch.Tensor], batches: list[list[int]], y: torch.Tensor,
                    loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, schedule,
                    autocast: Callable[[], AbstractContextManager], world: World = SOLO, desc: str = "") -> float:
    """One pass over ``batches`` of the training split; returns the mean training loss.

    ``forward(split, rows)`` gives the logits (``source.logits``, or DistributedDataParallel over it).
    Under data parallelism every rank walks the same global batches and takes its share of the
    rows; its loss is scaled so that the gradients DDP averages are the global batch's (see
    ``rank_share``): the optimizer steps as one process would."""
    source.prep.model.train()
    loss_fn.train()
    device = source.prep.device
    weight = getattr(loss_fn, "weight", None)
    weight = None if weight is None else weight.cpu()  # once: the ranks' shares are counted on the host
    total, n = 0.0, 0
    for idx in tqdm(batches, desc=desc, leave=False, unit="batch", disable=not desc):
        rows, share = rank_share(world, idx, y, weight)
        with autocast():
            logits = forward("train", rows)
        loss = loss_fn(logits.float(), y[rows].to(device)) * share
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        total += loss.item() / world.size * len(idx)  # the ranks' scaled losses add up to size x the batch's loss
        n += len(idx)
    mean = world.sum(torch.tensor([total], dtype=torch.float64)).item() / max(n, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"{desc or 'training'}: training loss is {mean}; lower -P lr_head / lr_backbone")
    return mean


def rank_share(world: World, idx: list[int], y: torch.Tensor, weight: torch.Tensor | None) -> tuple[list[int], float]:
    """This rank's rows of a global batch and the factor on their (weighted-mean) loss that makes
    DDP's average over ranks equal the whole batch's weighted mean: ``size x`` the rows' share of
    the batch's total target weight (``weight``: the loss's class weights on the CPU, or None). A
    rank with no rows runs one row at factor 0 (DDP needs every rank's backward). Why not torch's
    DistributedSampler: it splits the rows before batching, so the length-bucketed batches (and the
    optimizer steps) would differ from one process's."""
    if world.size == 1:
        return idx, 1.0
    rows = world.share(idx)
    if not rows:
        return idx[:1], 0.0
    if weight is None:
        return rows, world.size * len(rows) / len(idx)
    return rows, world.size * float(weight[y[rows]].sum() / weight[y[idx]].sum())


def evaluate(source: Source, loss_fn: torch.nn.Module, prep: Prepared, world: World = SOLO) -> tuple[np.ndarray, float]:
    """Class probabilities for the validation split (original order) and the validation loss.
    Under data parallelism each rank scores its share of the batches and every rank gets the sum:
    each row is scored once, on one rank."""
    prep.model.eval()
    loss_fn.eval()  # a logit-adjusted loss scores the plain logits, as served
    probs = torch.zeros(len(prep.val_ids), len(prep.labels))

    def run(idx: list[int]) -> tuple[float, int]:
        with torch.inference_mode(), torch.autocast(prep.device.type, dtype=prep.amp_dtype, enabled=prep.amp_dtype is not None):
            logits = source.logits("val", idx).float()
            loss = loss_fn(logits, prep.y_val[idx].to(prep.device)).item()
            probs[idx] = torch.softmax(logits, dim=-1).cpu()
        return loss * len(idx), len(idx)

    total, n = 0.0, 0
    for loss_sum, rows in for_each_batch(world.share(source.batches("val", None)), run, prep.device):
        total += loss_sum
        n += rows
    probs = world.sum(probs)
    total, n = world.sum(torch.tensor([total, n], dtype=torch.float64)).tolist()
    return probs.numpy(), total / max(n, 1)


def score_epoch(epoch: int, probs: np.ndarray, prep: Prepared, cfg: TrainConfig) -> EpochResult:
    """An epoch's validation report by its decision rule: for binary tasks a threshold tuned on
    these probabilities (``-P threshold=auto``), with the argmax metrics kept beside it."""
    y_val, spec = prep.y_val.numpy(), cfg.spec
    threshold = resolve_threshold(cfg.threshold, prep.labels, spec.minority_label, y_val, probs, cfg.collapse_dominance)
    report = evaluate_predictions(y_val, decide_labels(probs, prep.labels, threshold), prep.labels, spec.minority_label,
                                  cfg.collapse_dominance)
    argmax = {}
    if threshold is not None:
        plain = evaluate_predictions(y_val, probs.argmax(1), prep.labels, spec.minority_label, cfg.collapse_dominance)
        argmax = {k: plain.metrics[k] for k in ("minority_f1", "macro_f1", "accuracy", "collapsed")}
        argmax["threshold"] = threshold["value"]
    return EpochResult(epoch, report, float("nan"), float("nan"), None, probs, threshold, argmax)


def early_stop(epochs: list[EpochResult], patience: int, metric: str) -> str | None:
    """Why an attempt should stop now (``-P early_stopping=N``: N epochs without a better
    selection metric than the best before them), or None."""
    if patience <= 0 or len(epochs) <= patience:
        return None
    best_before = max(e.report.metrics[metric] for e in epochs[:-patience])
    if all(e.report.metrics[metric] <= best_before for e in epochs[-patience:]):
        return f"{metric} has not improved on {best_before:.4f} for {patience} epoch(s) (early_stopping={patience})"
    return None


def objective(prep: Prepared, cfg: TrainConfig, weights_scheme: str, loss: str) -> tuple[torch.nn.Module, np.ndarray]:
    """The loss of a recipe on this training split, and the class weights it uses."""
    from mycelium.train.losses import class_weights, make_loss

    weights = class_weights(prep.y_train.tolist(), len(prep.labels), weights_scheme, clip=cfg.weight_clip,
                            explicit=[float(w) for w in cfg.explicit_weights.split(",")] if cfg.explicit_weights else None,
                            label_names=prep.labels, beta=cfg.cb_beta)
    prior = torch.bincount(prep.y_train, minlength=len(prep.labels)).float() / len(prep.y_train)
    loss_fn = make_loss(loss, torch.tensor(weights, dtype=torch.float32, device=prep.device), cfg.focal_gamma,
                        prior=prior.to(prep.device), tau=cfg.la_tau)
    return loss_fn, weights


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """transformers' scheduler for ``-P lr_schedule`` / ``warmup_ratio``, stepped once per batch."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    total = steps_per_epoch * cfg.epochs
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
