"""The training core shared by C4, C5 and C6.

``run(cfg)`` loads and splits the data, opens a parent MLflow run, trains the first attempt (the
seed's recipe), climbs the task's fallback ladder when that attempt is weak or collapsed, and
promotes the best epoch to ``champion``. ``train_attempt`` is the training loop itself.

Frozen computation runs once: a frozen attempt trains the head on cached pooled features; a
partially unfrozen attempt caches the hidden states entering its first trainable block and runs
only the trainable blocks each epoch (``mycelium.features``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
import numpy as np
import torch

from . import features, figure_worker, search, tracking
from .checkpoint import backbone_manifest, bundle_backbone, read_manifest, save_checkpoint
from .config import TrainConfig
from .data.loading import LoadedData, load_task_data, write_rejects_jsonl
from .data.split import Split, split_records
from .loop import EpochResult, early_stop, evaluate, lr_schedule, objective, score_epoch, train_one_epoch
from .metrics import evaluate_predictions
from .model import (BackboneInfo, Classifier, apply_freezing, count_trainable, final_norm, load_backbone, param_groups,
                    transformer_blocks)
from .resume import ResumeState
from .serving import ModelTemplate, log_checkpoint, start_logged_model, upload_folder
from .text import encode_rows, length_buckets, pad_batch
from .threshold import predict as decide_labels

log = logging.getLogger("mycelium.train")


# ----------------------------------------------------------------------------- devices and precision


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype | None]:
    """``auto``: bf16 where the GPU supports it, fp16 (with a grad scaler) on older GPUs, fp32 on CPU."""
    if cfg.precision == "auto":
        if device.type != "cuda":
            return "fp32", None
        return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"parameter precision={cfg.precision} needs a CUDA GPU; use -P precision=auto or fp32 on {device}")
    return cfg.precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


# ----------------------------------------------------------------------------- attempts


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


@dataclass
class Prepared:
    """Data and backbone, loaded once per training and shared by every attempt."""

    data: LoadedData
    split: Split
    labels: list[str]
    y_train: torch.Tensor
    y_val: torch.Tensor
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    val_rows: list[tuple[str, ...]]
    model: Classifier
    tokenizer: object
    info: BackboneInfo
    pristine: dict[str, torch.Tensor]  # backbone weights of blocks an attempt may train, to reset between attempts
    device: torch.device
    precision: str
    amp_dtype: torch.dtype | None
    cache: features.FeatureCache | None
    token_budget: int  # resolved: padded tokens per training batch
    pass_budget: int  # resolved: padded tokens per batch of the no-grad backbone passes (features, prefix states)
    cache_memory_gb: float  # resolved: the largest prefix cache, GiB
    cached: dict[tuple, object] = field(default_factory=dict)

    def autocast(self):
        """The precision context of a forward pass, decided once (bf16/fp16 autocast on a GPU, none on a CPU)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def _selection_metric(cfg: TrainConfig) -> str:
    return "minority_f1" if cfg.spec.selection_metric == "minority_f1" else "macro_f1"


def next_attempt(step: str, results: list[AttemptResult], cfg: TrainConfig, n_blocks: int) -> Attempt | None:
    """The fallback ladder: which attempt (if any) a step adds after the results so far."""
    metric = _selection_metric(cfg)
    last = results[-1].attempt
    best = [r.best(metric) for r in results]
    best_value = max((b.report.metrics[metric] for b in best if b), default=0.0)
    collapsed = results[-1].best(metric) is None
    idx = last.index + 1
    if step == "unfreeze":
        if last.unfrozen_layers > 0 or (best_value >= cfg.fallback_threshold and not cfg.force_fallbacks):
            return None
        k = min(4, n_blocks)
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


# ----------------------------------------------------------------------------- preparation


def prepare(cfg: TrainConfig) -> Prepared:
    spec = cfg.spec
    data = load_task_data(cfg.data, spec, field_map=cfg.field_map or None, label_names=cfg.label_names or None, on_error=cfg.on_error)
    split = split_records(data.records, data.labels, val_fraction=cfg.val_fraction, seed=cfg.seed)
    labels = list(data.labels)
    index = {name: i for i, name in enumerate(labels)}

    device = resolve_device(cfg)
    precision, amp_dtype = resolve_precision(cfg, device)
    # fp32 master weights: transformers 5 would load Qwen2.5 in its config's bf16, where AdamW steps
    # at lr 2e-5 on unfrozen blocks round away; autocast gives bf16/fp16 speed on the GPU.
    backbone, tokenizer, info = load_backbone(cfg.backbone, cfg.revision or None, dtype=torch.float32,
                                              pooling=None if cfg.pooling == "auto" else cfg.pooling)
    torch.manual_seed(cfg.seed)
    model = Classifier(backbone, len(labels), pooling=info.pooling, dropout=cfg.dropout).to(device)

    # Tokenize once; every attempt and epoch reuses the ids.
    def encode(records):
        return encode_rows(tokenizer, [r.inputs for r in records], spec.input_fields, spec.separator, cfg.max_length,
                           spec.context_fields)

    train_ids, val_ids = encode(split.train), encode(split.val)

    n_blocks = len(transformer_blocks(model.backbone))
    trainable_names = _names_of_last_blocks(model, min(n_blocks, max(cfg.unfrozen_layers, 4 if "unfreeze" in cfg.fallback_steps() else 0)))
    pristine = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable_names}
    return Prepared(
        data=data, split=split, labels=labels,
        y_train=torch.tensor([index[r.label] for r in split.train]),
        y_val=torch.tensor([index[r.label] for r in split.val]),
        train_ids=train_ids, val_ids=val_ids, val_rows=[r.inputs for r in split.val],
        model=model, tokenizer=tokenizer, info=info, pristine=pristine,
        device=device, precision=precision, amp_dtype=amp_dtype,
        cache=features.FeatureCache() if cfg.cache else None,
        token_budget=cfg.token_budget or (8192 if device.type == "cuda" else 4096),
        pass_budget=cfg.token_budget or (8192 if device.type == "cuda" else 2048),
        cache_memory_gb=cfg.cache_memory_gb or round(features.auto_cache_budget_gb(), 1),
    )


def _names_of_last_blocks(model: Classifier, n: int) -> set[str]:
    """Parameter names of the last ``n`` blocks and the final norm: what an unfreezing attempt may change."""
    if n == 0:
        return set()
    names = {id(p): name for name, p in model.named_parameters()}
    blocks = transformer_blocks(model.backbone)
    modules = list(blocks[len(blocks) - n :])
    norm = final_norm(model.backbone)
    if norm is not None:
        modules.append(norm)
    return {names[id(p)] for m in modules for p in m.parameters()}


# ----------------------------------------------------------------------------- batch sources


class Source:
    """What one epoch iterates over: cached pooled features, cached prefix states, or token ids."""

    def __init__(self, prep: Prepared, cfg: TrainConfig, attempt: Attempt):
        self.prep, self.cfg = prep, cfg
        model = prep.model
        n_blocks = len(transformer_blocks(model.backbone))
        self.first_trainable = n_blocks - attempt.unfrozen_layers
        pad_id = prep.tokenizer.pad_token_id
        side = prep.tokenizer.padding_side
        self.pad_id, self.side = pad_id, side
        self.mode = "tokens"
        if cfg.cache:
            key_parts = dict(
                backbone=prep.info.name, revision=prep.info.revision, max_length=cfg.max_length, pooling=model.pooling,
                separator=cfg.spec.separator, fingerprint=prep.data.fingerprint, val_fraction=cfg.val_fraction, seed=cfg.seed,
                precision=prep.precision, context_fields=cfg.spec.context_fields,
            )
            total = sum(len(s) for s in prep.train_ids) + sum(len(s) for s in prep.val_ids)
            # Under bf16/fp16 autocast the states are stored in that dtype: half the memory.
            store = prep.amp_dtype or torch.float32
            prefix_ok = features.supports_suffix(model) and features.fits(features.prefix_bytes(total, model.hidden_size, store), prep.cache_memory_gb)
            fallback_k = n_blocks - min(4, n_blocks)

            def prefix(split: str, k: int):
                ids = prep.train_ids if split == "train" else prep.val_ids
                return self._cached(("prefix", split, k), key_parts, lambda: features.compute_prefix(
                    model, ids, k, pad_id=pad_id, pad_side=side, token_budget=prep.pass_budget, device=prep.device,
                    autocast_dtype=prep.amp_dtype, store_dtype=store))

            def pooled(split: str):
                # When the ladder may unfreeze, go through the fallback's prefix so one pass serves both.
                if prefix_ok and "unfreeze" in cfg.fallback_steps():
                    return features.pooled_from_prefix(model, prefix(split, fallback_k), pad_side=side, token_budget=prep.pass_budget,
                                                       device=prep.device, autocast_dtype=prep.amp_dtype)
                ids = prep.train_ids if split == "train" else prep.val_ids
                return features.compute_pooled(model, ids, pad_id=pad_id, pad_side=side, token_budget=prep.pass_budget,
                                               device=prep.device, autocast_dtype=prep.amp_dtype)

            if attempt.unfrozen_layers == 0:
                self.mode = "pooled"
                self.train_x = self._cached(("pooled", "train"), key_parts, lambda: pooled("train"))
                self.val_x = self._cached(("pooled", "val"), key_parts, lambda: pooled("val"))
            elif prefix_ok:
                self.mode = "prefix"
                self.train_x, self.val_x = prefix("train", self.first_trainable), prefix("val", self.first_trainable)
            else:
                log.warning("no prefix cache (%s): running the full forward every epoch",
                            "architecture not supported" if not features.supports_suffix(model)
                            else f"it would exceed cache_memory_gb={prep.cache_memory_gb:g}")
        log.info("attempt %s: batches from %s", attempt.name, self.mode)

    def _cached(self, name: tuple, key_parts: dict, compute):
        if name in self.prep.cached:
            return self.prep.cached[name]
        value = features.cached_compute(self.prep.cache, name, key_parts, compute)
        if isinstance(value, features.PrefixStates):  # computed or read from disk: on the GPU if it fits there
            value = features.place_states(value, self.prep.device)
        self.prep.cached[name] = value
        return value

    def lengths(self, split: str) -> list[int]:
        ids = self.prep.train_ids if split == "train" else self.prep.val_ids
        return [len(s) for s in ids]

    def batches(self, split: str, generator: torch.Generator | None) -> list[list[int]]:
        n = len(self.prep.train_ids if split == "train" else self.prep.val_ids)
        if self.mode == "pooled":  # features are fixed-size: plain (shuffled) minibatches
            order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
            size = self.cfg.batch_size if generator is not None else 4096
            return [order[i : i + size] for i in range(0, n, size)]
        return length_buckets(self.lengths(split), self.prep.token_budget, self.cfg.batch_size, generator)

    def logits(self, split: str, idx: list[int]) -> torch.Tensor:
        prep, model = self.prep, self.prep.model
        if self.mode == "pooled":
            x = (self.train_x if split == "train" else self.val_x)[idx].to(prep.device)
            return model.classify(x)
        if self.mode == "prefix":
            hidden, mask = (self.train_x if split == "train" else self.val_x).batch(idx, self.side, prep.device)
            return model.classify(features.suffix_encode(model, hidden, mask, self.first_trainable))
        ids = prep.train_ids if split == "train" else prep.val_ids
        input_ids, mask = pad_batch([ids[i] for i in idx], self.pad_id, self.side)
        return model(input_ids.to(prep.device), mask.to(prep.device))


# ----------------------------------------------------------------------------- the loop


def train_attempt(prep: Prepared, cfg: TrainConfig, attempt: Attempt, run_id: str, parent_run_id: str,
                  resume: ResumeState | None, lane: tracking.Lane) -> AttemptResult:
    """One attempt's epochs. Each epoch's logging and registration goes to ``lane`` (the tracking
    thread) and overlaps the next epoch; the attempt returns once all of them are registered."""
    model, device = prep.model, prep.device
    # Every attempt starts from the pretrained backbone and a fresh head.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in prep.pristine:
                p.copy_(prep.pristine[name])
    torch.manual_seed(cfg.seed + attempt.index)
    model.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    apply_freezing(model.backbone, attempt.unfrozen_layers)
    # The parts of the epochs' pyfunc models that do not change, made on the tracking thread.
    template = lane.submit(ModelTemplate, _manifest(prep, cfg, attempt), cfg.bundle_backbone)
    # The backbone pass runs alone (the tracking thread waits), so nothing needs the short GIL
    # switch interval; its two batch threads ran ~3% faster at CPython's default 5 ms than at
    # 0.1 ms (MiniLM, 4,000 C4 texts, 2 cores: slower at 0.1 ms in 6 of 8 alternating pairs, by
    # 0.5 s of ~15 s on average).
    with lane.paused(), _gil_switch_interval(0.005):
        source = Source(prep, cfg, attempt)

    loss_fn, weights = objective(prep, cfg, attempt.class_weights, attempt.loss)
    # fused: one kernel per step for all parameters; torch's CPU default is a Python loop over them.
    optimizer = torch.optim.AdamW(param_groups(model, attempt.lr_head or cfg.lr_head, cfg.lr_backbone, cfg.weight_decay), fused=True)
    steps_per_epoch = len(source.batches("train", None))
    schedule = lr_schedule(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=prep.precision == "fp16")
    counts = count_trainable(model)
    mlflow.log_params({"attempt": attempt.name, "unfrozen_layers": attempt.unfrozen_layers, "class_weights": attempt.class_weights,
                       "lr_head": attempt.lr_head or cfg.lr_head,
                       "loss": attempt.loss, "focal_gamma": cfg.focal_gamma if attempt.loss == "focal" else "",
                       "batches_from": source.mode, "trainable_params": counts["total"], "trainable_backbone_params": counts["backbone"],
                       **{f"weight_{label}": f"{w:.4f}" for label, w in zip(prep.labels, weights)}})

    result = AttemptResult(attempt, run_id, [])
    start_epoch = 1
    if resume is not None:
        start_epoch = resume.restore(model, optimizer, scaler) + 1
        result.epochs = resume.epoch_results()
        with warnings.catch_warnings():  # stepping a fresh schedule to where the run stopped, without optimizer steps
            warnings.simplefilter("ignore")
            for _ in range((start_epoch - 1) * steps_per_epoch):
                schedule.step()
        log.info("resuming attempt %s at epoch %d", attempt.name, start_epoch)
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * attempt.index)
    for _ in range(1, start_epoch):  # keep the shuffling sequence identical to an uninterrupted run
        source.batches("train", generator)

    run = mlflow.get_run(run_id)  # the tracking thread logs to it by id (MLflow's active run is per thread)
    threads = torch.get_num_threads()
    if source.mode == "pooled" and device.type == "cpu":
        # A head on cached features is a few tiny matmuls per step: a second intra-op thread costs
        # more in synchronisation than it saves, and every op stalls while the tracking thread or
        # the local MLflow/S3 servers hold the other core.
        torch.set_num_threads(1)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stop_reason := early_stop(result.epochs, cfg.early_stopping, _selection_metric(cfg)):
                log.info("attempt %s stops before epoch %d: %s", attempt.name, epoch, stop_reason)
                mlflow.set_tags({"stopped_early": "true", "stop_reason": stop_reason})
                break
            lane.check()  # a failed upload of an earlier epoch stops training here
            train_loss = train_one_epoch(source, source.batches("train", generator), prep.y_train, loss_fn, optimizer, scaler,
                                         schedule, prep.autocast, desc=f"{attempt.name} epoch {epoch}/{cfg.epochs}")
            probs, val_loss = evaluate(source, loss_fn, prep)
            ep = score_epoch(epoch, probs, prep, cfg)
            ep.train_loss, ep.val_loss = train_loss, val_loss
            result.epochs.append(ep)
            # Snapshot here (weights, optimizer, RNG as of this epoch); publish in the background.
            ckpt = save_epoch_checkpoint(prep, cfg, attempt, ep, run_id)
            pending = ResumeState.save(parent_run_id, attempt, epoch, model, optimizer, scaler, result.epochs)
            lane.submit(publish_epoch, prep, cfg, attempt, ep, run, parent_run_id, ckpt, template, pending, list(result.epochs),
                        may_exist=resume is not None and epoch == start_epoch)
    except BaseException:
        lane.drain(raise_errors=False)  # publish the epochs trained so far; the training error is the one to report
        raise
    else:
        lane.drain()
    finally:
        torch.set_num_threads(threads)
        # Every job of this attempt has run (or will never run) by now: the template is done with.
        if template.done() and template.exception() is None:
            template.result().close()
    return result


def publish_epoch(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run, parent_run_id: str, ckpt: Path,
                  template: Future, pending_state: Path, epochs: list[EpochResult], may_exist: bool) -> None:
    """Log and register one epoch, then make its resume state the live one (tracking thread)."""
    ep.version = log_epoch(prep, cfg, attempt, ep, run, parent_run_id, ckpt, template.result(), may_exist)
    ResumeState.commit(pending_state, epochs)
    metric = _selection_metric(cfg)
    log.info("%s epoch %d: train_loss %.4f val_loss %.4f %s %.4f%s (version %s)", attempt.name, ep.epoch, ep.train_loss, ep.val_loss,
             metric, ep.report.metrics[metric], " COLLAPSED" if ep.report.collapsed else "", ep.version)


def _manifest(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult | None = None) -> dict:
    """The checkpoint manifest of an attempt's epoch (without ``ep``: what all its epochs share)."""
    manifest = {
        "task": cfg.task, "labels": prep.labels, "input_fields": list(cfg.spec.input_fields), "allow_empty": list(cfg.spec.allow_empty),
        "context_fields": [f for f in cfg.spec.context_fields if f in cfg.spec.input_fields],
        "separator": cfg.spec.separator, "max_length": cfg.max_length,
        "backbone": backbone_manifest(prep.info),
        "n_unfrozen": attempt.unfrozen_layers, "head": {"dropout": cfg.dropout}, "precision": prep.precision,
        "attempt": attempt.name, "data_fingerprint": prep.data.fingerprint,
    }
    if ep is not None:
        manifest.update({"epoch": ep.epoch, "metrics": ep.report.metrics, "threshold": ep.threshold})
    return manifest


def save_epoch_checkpoint(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run_id: str) -> Path:
    """The epoch's checkpoint on local disk; it stays there until its upload and registration succeeded."""
    workdir = Path(os.environ.get("MYCELIUM_STATE", ".mycelium")) / "checkpoints" / run_id / f"epoch-{ep.epoch:03d}"
    shutil.rmtree(workdir, ignore_errors=True)
    return save_checkpoint(prep.model, workdir / "checkpoint", _manifest(prep, cfg, attempt, ep))


def log_epoch(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run, parent_run_id: str, ckpt: Path,
              template: ModelTemplate, may_exist: bool = False) -> str:
    """Metrics, confusion matrix and the registered checkpoint of one epoch of ``run``; returns the version.

    ``may_exist``: the first epoch of a resumed attempt, which may have been registered before
    the run died (found by tag, not registered twice)."""
    report = ep.report
    metric = _selection_metric(cfg)
    run_id = run.info.run_id
    client = MlflowClient()
    metrics = {"train_loss": ep.train_loss, "val_loss": ep.val_loss, **report.prefixed("val_"),
               **{f"val_argmax_{k}": float(v) for k, v in ep.argmax.items()}}
    run_tags = {"collapsed": str(report.collapsed).lower(), "collapse_reason": "; ".join(report.collapse_reasons),
                "last_completed_epoch": str(ep.epoch)}
    existing = tracking.existing_version(cfg.registered_model, run_id, ep.epoch) if may_exist else None
    if existing is not None:  # a resumed run that died after registering this epoch
        tracking.log_batch(client, run_id, metrics, ep.epoch, run_tags)
        shutil.rmtree(ckpt.parent, ignore_errors=True)  # already uploaded: the local copy is not needed
        return existing.version
    if cfg.bundle_backbone:
        bundle_backbone(ckpt, cfg.backbone, cfg.revision or None)
    manifest = read_manifest(ckpt)

    # The epoch's model first, so its metrics are logged against it (the UI shows them on the
    # model page too): metrics and run tags in one request.
    logged = tracking.with_retries("creation of the epoch's logged model",
                                   lambda: start_logged_model(f"{attempt.name}-epoch-{ep.epoch}", manifest, run))
    tracking.log_batch(client, run_id, metrics, ep.epoch, run_tags, model_id=logged.model_id)
    confusion = ckpt.parent / "confusion"
    confusion.mkdir(exist_ok=True)
    stem = f"epoch-{ep.epoch:03d}"
    (confusion / f"{stem}.json").write_text(json.dumps(
        {"labels": report.labels, "matrix": report.confusion, "epoch": ep.epoch, "collapsed": report.collapsed,
         "never_predicted": report.never_predicted, "zero_recall": report.zero_recall}, indent=2))
    (confusion / f"{stem}.png").write_bytes(figure_worker.png(
        "confusion_matrix", confusion=report.confusion, labels=report.labels, title=f"{cfg.task} {attempt.name} epoch {ep.epoch}"))
    tags = {
        "task": cfg.task, "epoch": ep.epoch, "run_id": run_id, "parent_run_id": parent_run_id, "attempt": attempt.name,
        "collapsed": str(report.collapsed).lower(), "data_fingerprint": prep.data.fingerprint, "selection_metric": metric,
        metric: f"{report.metrics[metric]:.6f}", "macro_f1": f"{report.metrics['macro_f1']:.6f}",
        "accuracy": f"{report.metrics['accuracy']:.6f}", "backbone": manifest["backbone"]["name"],
        "threshold": "argmax" if ep.threshold is None else f"{ep.threshold['label']} >= {ep.threshold['value']:.4f}",
    }
    if report.collapsed:
        tags["collapse_reason"] = "; ".join(report.collapse_reasons)
    if cfg.min_metric > 0:
        tags["meets_min_metric"] = str(report.metrics[metric] >= cfg.min_metric).lower()
    try:
        tracking.with_retries(f"upload of the epoch {ep.epoch} confusion matrix",
                              lambda: upload_folder(confusion, f"{run.info.artifact_uri.rstrip('/')}/confusion"))
        info = tracking.with_retries(
            f"upload and registration of the epoch {ep.epoch} checkpoint",
            lambda: log_checkpoint(ckpt, logged_model=logged, template=template, registered_model_name=cfg.registered_model,
                                   version_tags=tags, run=run),
        )
    except tracking.TrackingError as e:
        raise tracking.TrackingError(f"{e}. The checkpoint is kept on local disk at {ckpt.absolute()}") from e
    shutil.rmtree(ckpt.parent, ignore_errors=True)  # uploaded and registered: the local copy has done its job
    return str(info.registered_model_version)


# ----------------------------------------------------------------------------- the whole training


@dataclass
class RunResult:
    parent_run_id: str
    attempts: list[AttemptResult]
    winner: tuple[AttemptResult, EpochResult] | None
    decision: tracking.Decision
    labels: list[str]
    ui: str


@contextmanager
def _gil_switch_interval(seconds: float):
    """CPython's GIL switch interval for the duration of the block."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run(cfg: TrainConfig) -> RunResult:
    """Train a task end to end (see the module docstring); the result names the parent run."""
    # The training thread shares the GIL with the tracking thread. CPython hands it back to a
    # waiting thread only every 5 ms by default, which the training thread pays after each of its
    # many short torch calls. 2-core measurements, a head-only step (2.5 ms alone) while another
    # thread draws confusion matrices: 18-19 ms at 5 ms, 16 ms at 0.5 ms, 7.7 ms at 0.1 ms, and
    # the drawing thread no slower (it holds the GIL; the torch calls mostly do not).
    try:
        with _gil_switch_interval(min(sys.getswitchinterval(), 0.0001)):
            return _run(cfg)
    finally:
        figure_worker.shutdown()


def _run(cfg: TrainConfig) -> RunResult:
    cfg.validate()
    figure_worker.start()  # its matplotlib import overlaps data loading
    tracking.preflight()
    prep = prepare(cfg)
    metric = _selection_metric(cfg)
    mlflow.set_experiment(cfg.experiment)
    tracking.ensure_registered_model(cfg.registered_model, cfg.spec.description)

    resumed = tracking.find_resumable(cfg.experiment, cfg.task, prep.data.fingerprint) if cfg.resume else None
    if cfg.resume and resumed is None:
        log.warning("resume=true but no unfinished run of %s on this data: starting a new run", cfg.task)
    parent_id = resumed.info.run_id if resumed else None
    # `mlflow run` opens a run (MLFLOW_RUN_ID) in the experiment named on its command line. It becomes
    # the parent when it is in this task's experiment; otherwise the parent goes to the task's
    # experiment (one experiment per task) and the launcher run gets a link to it.
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher and parent_id is None:
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is not None and MlflowClient().get_run(launcher).info.experiment_id == exp.experiment_id:
            parent_id, launcher = launcher, None
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else (cfg.run_name or None)) as parent, tracking.Lane(paused=True) as lane:
        pid = parent.info.run_id
        if resumed is None:
            # The tags that make the run findable (and resumable) now; the rest on the tracking thread.
            mlflow.set_tags({"task": cfg.task, "data_fingerprint": prep.data.fingerprint, "backbone": prep.info.name,
                             "mycelium_role": "parent", "mycelium_state": "running", **tracking.system_tags()})
            lane.submit(_log_parent_start, prep, cfg, pid)
        done = {int(r.data.tags["attempt_index"]): r for r in tracking.child_runs(pid, parent.info.experiment_id)
                if r.data.tags.get("mycelium_role") == "attempt"} if resumed else {}

        n_blocks = len(transformer_blocks(prep.model.backbone))
        if 1 in done:  # a resumed run continues the first attempt it chose
            tags = done[1].data.tags
            attempt = Attempt(1, tags["attempt"], int(tags["unfrozen_layers"]), tags["class_weights"], tags["loss"], tags["changed"],
                              float(done[1].data.params.get("lr_head", cfg.lr_head)))
        elif cfg.search == "grid" and cfg.unfrozen_layers == 0:
            attempt = _search_first_attempt(prep, cfg, lane)
        else:
            attempt = Attempt(1, _first_name(cfg), cfg.unfrozen_layers, cfg.class_weights, cfg.loss, "seed recipe")
        results: list[AttemptResult] = []
        steps = list(cfg.fallback_steps())
        while attempt is not None:
            results.append(_run_child(prep, cfg, attempt, pid, done.get(attempt.index), lane))
            attempt = None
            while steps and attempt is None:
                attempt = next_attempt(steps.pop(0), results, cfg, n_blocks)

        lane.submit(_log_attempts_figure, prep, cfg, results, pid)  # drawn and uploaded while the champion is decided
        winner = _winner(results, metric)
        candidate = tracking.Candidate(winner[1].version, metric, winner[1].report.metrics[metric], prep.data.fingerprint) if winner else None
        decision = tracking.decide_promotion(cfg.registered_model, candidate, rescore_champion=lambda v: _rescore(v, prep, cfg),
                                             min_metric=cfg.min_metric)
        _log_parent_end(cfg, results, winner, decision, pid)
        lane.drain()
        mlflow.set_tag("mycelium_state", "done")  # last: a run without it is resumable
        ui = tracking.ui_url(parent)
    if launcher:
        MlflowClient().set_tag(launcher, "mycelium_training_run", ui)
        log.info("training logged in experiment %s: %s (pass --experiment-name %s to `mlflow run` to use one run)",
                 cfg.experiment, ui, cfg.experiment)
    ResumeState.clear(pid)
    return RunResult(pid, results, winner, decision, prep.labels, ui)


def _search_first_attempt(prep: Prepared, cfg: TrainConfig, lane: tracking.Lane) -> Attempt:
    """The head recipe search (``-P search=grid``) as a ``0-search`` child run; its winner is attempt 1."""
    metric = _selection_metric(cfg)
    probe = Attempt(1, "search", 0, cfg.class_weights, cfg.loss, "")
    apply_freezing(prep.model.backbone, 0)
    with lane.paused(), _gil_switch_interval(0.005):
        source = Source(prep, cfg, probe)  # the cached features the first attempt then reuses
    threads = torch.get_num_threads()
    if prep.device.type == "cpu":
        torch.set_num_threads(1)  # tiny head matmuls, as in train_attempt
    try:
        trials = search.search_heads(prep, cfg, source, metric)
    finally:
        torch.set_num_threads(threads)
    win = search.best(trials)
    with mlflow.start_run(run_name="0-search", nested=True):
        mlflow.set_tags({"mycelium_role": "search", "task": cfg.task, "data_fingerprint": prep.data.fingerprint,
                         "chosen": win.recipe.name})
        mlflow.log_params({"trials": len(trials), "chosen_class_weights": win.recipe.class_weights, "chosen_loss": win.recipe.loss,
                           "chosen_lr_head": win.recipe.lr_head})
        mlflow.log_metrics({f"best_{metric}": win.metric})
        mlflow.log_table({"recipe": [t.recipe.name for t in trials], "class_weights": [t.recipe.class_weights for t in trials],
                          "loss": [t.recipe.loss for t in trials], "lr_head": [t.recipe.lr_head for t in trials],
                          f"val_{metric}": [t.metric for t in trials], "best_epoch": [t.epoch or 0 for t in trials],
                          "epochs_run": [t.epochs_run for t in trials]}, "search_trials.json")
    log.info("head recipe search: %d trials, best %s (val %s %.4f)", len(trials), win.recipe.name, metric, win.metric)
    r = win.recipe
    return Attempt(1, f"frozen-{r.class_weights}-{r.loss}", 0, r.class_weights, r.loss,
                   f"head recipe search winner of {len(trials)} (lr_head {r.lr_head:g})", r.lr_head)


def _first_name(cfg: TrainConfig) -> str:
    frozen = "frozen" if cfg.unfrozen_layers == 0 else f"unfreeze{cfg.unfrozen_layers}"
    return f"{frozen}-{cfg.class_weights}-{cfg.loss}"


def _run_child(prep: Prepared, cfg: TrainConfig, attempt: Attempt, parent_id: str, previous, lane: tracking.Lane) -> AttemptResult:
    resume = None
    if previous is not None:
        if previous.data.tags.get("mycelium_state") == "done":
            return ResumeState.finished_attempt(previous, attempt, prep)
        resume = ResumeState.load(parent_id, attempt)
    run_name = f"{attempt.index}-{attempt.name}"
    with mlflow.start_run(run_id=previous.info.run_id if previous else None, run_name=None if previous else run_name, nested=True) as child:
        if previous is None:
            mlflow.set_tags({"attempt_index": attempt.index, "attempt": attempt.name, "changed": attempt.changed,
                             "unfrozen_layers": attempt.unfrozen_layers, "class_weights": attempt.class_weights, "loss": attempt.loss,
                             "task": cfg.task, "data_fingerprint": prep.data.fingerprint, "mycelium_role": "attempt"})
        result = train_attempt(prep, cfg, attempt, child.info.run_id, parent_id, resume, lane)
        best = result.best(_selection_metric(cfg))
        mlflow.set_tags({"best_epoch": best.epoch if best else "none", "mycelium_state": "done",
                         "attempt_collapsed": str(best is None).lower()})
    return result


def _winner(results: list[AttemptResult], metric: str) -> tuple[AttemptResult, EpochResult] | None:
    best = [(r, r.best(metric)) for r in results]
    best = [(r, e) for r, e in best if e is not None]
    return max(best, key=lambda re: re[1].report.metrics[metric]) if best else None


def _rescore(champion_version, prep: Prepared, cfg: TrainConfig) -> float | None:
    """The current champion's selection metric on this run's validation data (it was trained on other data)."""
    from .checkpoint import clear_backbone_cache, load_checkpoint, predict_proba

    try:
        path = mlflow.artifacts.download_artifacts(f"models:/{cfg.registered_model}/{champion_version.version}")
        model, tokenizer, manifest = load_checkpoint(Path(path) / "artifacts" / "checkpoint", device=prep.device)
        if list(manifest["labels"]) != prep.labels:
            log.warning("champion v%s has labels %s, this data %s: not comparable", champion_version.version, manifest["labels"], prep.labels)
            return None
        probs = predict_proba(model, tokenizer, manifest, prep.val_rows, device=prep.device)
    except Exception as e:  # noqa: BLE001 - an unloadable champion is kept, with the reason logged
        log.warning("could not re-score champion v%s on this data: %s", champion_version.version, e)
        return None
    finally:
        clear_backbone_cache()  # the champion's backbone copy is not needed after scoring
    labels = decide_labels(probs, prep.labels, manifest.get("threshold"))  # the champion's own decision rule
    report = evaluate_predictions(prep.y_val.numpy(), labels, prep.labels, cfg.spec.minority_label, cfg.collapse_dominance)
    return None if report.collapsed else report.metrics[_selection_metric(cfg)]


def _log_parent_start(prep: Prepared, cfg: TrainConfig, run_id: str) -> None:
    """Params, the class distribution (metrics, JSON, bar chart) and rejected records of the parent
    run, by run id: it runs on the tracking thread (after the first backbone pass)."""
    client = MlflowClient()
    params = cfg.params()
    params.update({"precision_resolved": prep.precision, "device_resolved": str(prep.device), "token_budget_resolved": prep.token_budget,
                   "pass_token_budget_resolved": prep.pass_budget,
                   "cache_memory_gb_resolved": prep.cache_memory_gb,
                   "backbone_revision": prep.info.revision,
                   "backbone_architecture": prep.info.architecture, "pooling": prep.model.pooling, "labels": ",".join(prep.labels),
                   "selection_metric": _selection_metric(cfg), "n_train": len(prep.split.train), "n_val": len(prep.split.val),
                   **{k: v for k, v in prep.data.summary().items() if k != "labels"}})
    tracking.log_params_once(tracking.scrub({k: str(v)[:6000] for k, v in params.items()}), run_id)
    # Class distribution before training: metrics, a JSON and a bar chart.
    counts = {s: dict(c) for s, c in prep.split.counts.items() if sum(c.values())}
    metrics = {}
    for split_name, per_label in counts.items():
        total = sum(per_label.values())
        metrics.update({f"{split_name}_count_{k}": float(v) for k, v in per_label.items()})
        metrics.update({f"{split_name}_share_{k}": v / total for k, v in per_label.items()})
    if prep.data.rejects:
        metrics["data_skipped"] = float(prep.data.n_skipped)
    tracking.log_batch(client, run_id, metrics, 0, {})
    client.log_text(run_id, json.dumps({"counts": counts, "warnings": prep.split.warnings}, indent=2), "data/class_distribution.json")
    tracking.log_png(client, run_id, figure_worker.png("class_distribution", counts=counts, title=f"{cfg.task} class distribution"),
                     "data/class_distribution.png")
    if prep.data.rejects:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "rejected_records.jsonl"
            write_rejects_jsonl(prep.data.rejects, path)
            client.log_artifact(run_id, str(path), "data")


def _log_attempts_figure(prep: Prepared, cfg: TrainConfig, results: list[AttemptResult], run_id: str) -> None:
    """Each attempt's best epoch side by side (per-class F1, predicted vs true distribution), by run id."""
    metric = _selection_metric(cfg)
    attempts = {}
    for r in results:
        best = r.best(metric) or max(r.epochs, key=lambda e: e.report.metrics[metric])
        attempts[f"{r.attempt.index}-{r.attempt.name}"] = best.report.metrics
    tracking.log_png(MlflowClient(), run_id, figure_worker.png("attempts", attempts=attempts, labels=prep.labels),
                     "attempts_comparison.png")


def _log_parent_end(cfg: TrainConfig, results: list[AttemptResult], winner, decision: tracking.Decision, run_id: str) -> None:
    """The winner and the promotion decision: parent run tags and metrics in one request, and the winning version's tags."""
    metric = _selection_metric(cfg)
    tags = decision.as_tags()
    metrics = {"attempts": float(len(results))}
    if winner:
        r, e = winner
        tags.update({"winner_attempt": f"{r.attempt.index}-{r.attempt.name}", "winner_run_id": r.run_id,
                     "winner_epoch": str(e.epoch), "winner_version": str(e.version)})
        metrics.update({f"best_{metric}": e.report.metrics[metric], "best_macro_f1": e.report.metrics["macro_f1"]})
        # The version already carries its run, attempt and epoch (registration tags): it gets the decision only.
        tracking.tag_version(cfg.registered_model, e.version, decision.as_tags())
    else:
        tags["winner_attempt"] = "none (all collapsed)"
    tracking.log_batch(MlflowClient(), run_id, metrics, 0, tags)
