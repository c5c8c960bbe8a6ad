"""What every rank runs of a training: an attempt's torch state and its epochs.

Rank 0 runs them from ``mycelium.train.run`` (which tracks, registers and decides) and announces
each step first; the other ranks run the same functions at its word (``follow``), so the frozen
passes, DDP's gradient averaging and the validation gathers line up. One process is a world of
one: ``announce`` returns at once and nothing else changes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mycelium.config import TrainConfig
from mycelium.model.blocks import apply_freezing
from mycelium.model.classifier import param_groups
from mycelium.train.attempts import Attempt
from mycelium.train.loop import evaluate, lr_schedule, objective, train_one_epoch
from mycelium.train.prepare import Prepared
from mycelium.train.resume import ResumeState
from mycelium.train.sources import Source
from mycelium.train.tuning import head_only_threads

log = logging.getLogger(__name__)


@dataclass
class AttemptState:
    """An attempt's model inputs, objective and optimizer, and the epoch it goes on from."""

    source: Source
    forward: Callable[[str, list[int]], torch.Tensor]  # source.logits, or DDP over it
    loss_fn: nn.Module
    weights: np.ndarray
    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    first_epoch: int


class _Logits(nn.Module):
    """``Source.logits`` as a module, so that DistributedDataParallel can wrap it: DDP averages the
    gradients of whatever parameters a forward through it used (head, unfrozen blocks)."""

    def __init__(self, source: Source):
        super().__init__()
        self.model = source.prep.model
        self.source = source  # not a module: a plain attribute

    def forward(self, split: str, rows: list[int]) -> torch.Tensor:
        return self.source.logits(split, rows)


def announce(prep: Prepared, what: str, arg: object = None) -> None:
    """Rank 0 tells the other ranks the next collective step (``follow`` runs it there)."""
    prep.world.broadcast((what, arg))


def start_attempt(prep: Prepared, cfg: TrainConfig, attempt: Attempt, resume: ResumeState | None) -> AttemptState:
    """Reset the model to the pretrained backbone and a fresh head, build the attempt's source
    (the frozen pass, shared out over the ranks), objective and optimizer; on a resume restore
    rank 0's saved state (``resume`` is rank 0's) and send it to the other ranks."""
    model, device, world = prep.model, prep.device, prep.world
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in prep.pristine:
                p.copy_(prep.pristine[name])
    torch.manual_seed(cfg.seed + attempt.index)
    model.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    apply_freezing(model.backbone, attempt.unfrozen_layers)
    source = Source(prep, cfg, attempt)

    loss_fn, weights = objective(prep, cfg, attempt.class_weights, attempt.loss)
    # fused: one kernel per step for all parameters; torch's CPU default is a Python loop over them.
    optimizer = torch.optim.AdamW(param_groups(model, attempt.lr_head or cfg.lr_head, cfg.lr_backbone, cfg.weight_decay), fused=True)
    steps_per_epoch = len(source.batches("train", None))
    schedule = lr_schedule(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=prep.precision == "fp16")
    done = resume.restore(model, optimizer, scaler) if resume is not None else 0
    if world.size > 1:
        # Rank 0's epoch and optimizer state on every rank; DDP below sends its weights.
        done, state = world.broadcast((done, _on_cpu((optimizer.state_dict(), scaler.state_dict())) if done else None)
                                      if world.main else None)
        if done and not world.main:
            optimizer.load_state_dict(state[0])
            scaler.load_state_dict(state[1])
    if done:
        with warnings.catch_warnings():  # stepping a fresh schedule to where the run stopped, without optimizer steps
            warnings.simplefilter("ignore")
            for _ in range(done * steps_per_epoch):
                schedule.step()
        log.info("resuming attempt %s at epoch %d", attempt.name, done + 1)
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * attempt.index)
    for _ in range(done):  # keep the shuffling sequence identical to an uninterrupted run
        source.batches("train", generator)
    forward = source.logits
    if world.size > 1:
        forward = DistributedDataParallel(_Logits(source), device_ids=[device] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)  # no batch-norm style buffers to keep in step
    return AttemptState(source, forward, loss_fn, weights, optimizer, schedule, scaler, generator, done + 1)


def run_epoch(state: AttemptState, prep: Prepared, desc: str = "") -> tuple[float, np.ndarray, float]:
    """One epoch: train, then the validation probabilities and loss (every rank gets all of them)."""
    source = state.source
    with head_only_threads(prep.device, head_only=source.mode == "pooled"):
        train_loss = train_one_epoch(source, state.forward, source.batches("train", state.generator), prep.y_train, state.loss_fn,
                                     state.optimizer, state.scaler, state.schedule, prep.autocast, prep.world, desc=desc)
        probs, val_loss = evaluate(source, state.loss_fn, prep, prep.world)
    return train_loss, probs, val_loss


def probe_source(prep: Prepared, cfg: TrainConfig, probe: Attempt) -> Source:
    """The frozen features the head recipe search trains on (rank 0 searches alone; the first attempt reuses them)."""
    apply_freezing(prep.model.backbone, 0)
    return Source(prep, cfg, probe)


def follow(prep: Prepared, cfg: TrainConfig) -> None:
    """Ranks other than 0: run each step rank 0 announces until it says done. They never talk to
    MLflow or S3; if rank 0 fails, the launcher (or the collective timeout) ends them."""
    state = None
    while True:
        what, arg = prep.world.broadcast()
        if what == "attempt":
            state = start_attempt(prep, cfg, arg, None)
        elif what == "epoch":
            run_epoch(state, prep)
        elif what == "probe":
            probe_source(prep, cfg, arg)
        elif what == "done":
            return
        else:
            raise RuntimeError(f"rank {prep.world.rank}: unknown announcement {what!r} from rank 0")


def _on_cpu(value):
    """Tensors of a state dict on the CPU: they travel pickled, and a GPU tensor would land on rank 0's GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value
