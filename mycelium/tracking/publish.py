"""Publishing one epoch: its checkpoint saved locally, then (on the tracking thread) its metrics,
confusion matrix and registered pyfunc version."""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import Future
from pathlib import Path

from mlflow import MlflowClient

from mycelium.config import TrainConfig, state_root
from mycelium.serving.checkpoint import (
    backbone_manifest,
    bundle_backbone,
    read_manifest,
    save_checkpoint,
)
from mycelium.serving.package import (
    ModelTemplate,
    log_checkpoint,
    start_logged_model,
    upload_folder,
)
from mycelium.tracking import figure_worker
from mycelium.tracking.registry import existing_version
from mycelium.tracking.outage import TrackingOutage, with_retries
from mycelium.tracking.runs import log_batch
from mycelium.train.attempts import Attempt
from mycelium.train.loop import EpochResult
from mycelium.train.prepare import Prepared
from mycelium.train.resume import ResumeState

log = logging.getLogger(__name__)


def publish_epoch(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run, parent_run_id: str, ckpt: Path,
                  template: Future, pending_state: Path, epochs: list[EpochResult], may_exist: bool) -> None:
    """Log and register one epoch, then make its resume state the live one (tracking thread)."""
    ep.version = log_epoch(prep, cfg, attempt, ep, run, parent_run_id, ckpt, template.result(), may_exist)
    ResumeState.commit(pending_state, epochs)
    metric = cfg.spec.selection_metric
    log.info("%s epoch %d: train_loss %.4f val_loss %.4f %s %.4f%s (version %s)", attempt.name, ep.epoch, ep.train_loss, ep.val_loss,
             metric, ep.report.metrics[metric], " COLLAPSED" if ep.report.collapsed else "", ep.version)


def epoch_manifest(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult | None = None) -> dict:
    """The checkpoint manifest of an attempt's epoch (without ``ep``: what all its epochs share)."""
    manifest = {
        "task": cfg.task, "labels": prep.labels, "input_fields": list(cfg.spec.input_fields), "allow_empty": list(cfg.spec.allow_empty),
        "context_fields": [f for f in cfg.spec.context_fields if f in cfg.spec.input_fields],
        "separator": cfg.spec.separator, "numbers": cfg.numbers, "max_length": cfg.max_length,
        "backbone": backbone_manifest(prep.info),
        "n_unfrozen": attempt.unfrozen_layers, "head": {"dropout": cfg.dropout}, "precision": prep.precision,
        "attempt": attempt.name, "data_fingerprint": prep.data.fingerprint,
    }
    if ep is not None:
        manifest.update({"epoch": ep.epoch, "metrics": ep.report.metrics, "threshold": ep.threshold})
    return manifest


def save_epoch_checkpoint(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run_id: str) -> Path:
    """The epoch's checkpoint on local disk; it stays there until its upload and registration succeeded."""
    workdir = state_root() / "checkpoints" / run_id / f"epoch-{ep.epoch:03d}"
    shutil.rmtree(workdir, ignore_errors=True)
    return save_checkpoint(prep.model, workdir / "checkpoint", epoch_manifest(prep, cfg, attempt, ep))


def log_epoch(prep: Prepared, cfg: TrainConfig, attempt: Attempt, ep: EpochResult, run, parent_run_id: str, ckpt: Path,
              template: ModelTemplate, may_exist: bool = False) -> str:
    """Metrics, confusion matrix and the registered checkpoint of one epoch of ``run``; returns the version.

    ``may_exist``: the first epoch of a resumed attempt, which may have been registered before
    the run died (found by tag, not registered twice)."""
    report = ep.report
    metric = cfg.spec.selection_metric
    run_id = run.info.run_id
    client = MlflowClient()
    metrics = {"train_loss": ep.train_loss, "val_loss": ep.val_loss, **report.prefixed("val_"),
               **{f"val_argmax_{k}": float(v) for k, v in ep.argmax.items()}}
    run_tags = {"collapsed": str(report.collapsed).lower(), "collapse_reason": "; ".join(report.collapse_reasons),
                "last_completed_epoch": str(ep.epoch)}
    existing = existing_version(cfg.registered_model, run_id, ep.epoch) if may_exist else None
    if existing is not None:  # a resumed run that died after registering this epoch
        if ep.epoch not in {m.step for m in client.get_metric_history(run_id, "val_loss")}:  # each step once
            log_batch(client, run_id, metrics, ep.epoch, run_tags)
        shutil.rmtree(ckpt.parent, ignore_errors=True)  # already uploaded: the local copy is not needed
        return existing.version
    if cfg.bundle_backbone:
        bundle_backbone(ckpt, cfg.backbone, cfg.revision or None)
    manifest = read_manifest(ckpt)

    # The epoch's model first, so its metrics are logged against it (the UI shows them on the
    # model page too). The metrics go last, once the version exists: an upload that fails leaves no
    # metric point that the resumed epoch would log a second time.
    logged = with_retries("creation of the epoch's logged model",
                          lambda: start_logged_model(f"{attempt.name}-epoch-{ep.epoch}", manifest, run), cfg.retry_seconds)
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
        with_retries(f"upload of the epoch {ep.epoch} confusion matrix",
                     lambda: upload_folder(confusion, f"{run.info.artifact_uri.rstrip('/')}/confusion"), cfg.retry_seconds)
        info = with_retries(
            f"upload and registration of the epoch {ep.epoch} checkpoint",
            lambda: log_checkpoint(ckpt, logged_model=logged, template=template, registered_model_name=cfg.registered_model,
                                   version_tags=tags, run=run),
            cfg.retry_seconds,
        )
    except TrackingOutage:
        _discard_pending(client, logged.model_id)
        raise
    log_batch(client, run_id, metrics, ep.epoch, run_tags, model_id=logged.model_id)  # metrics and run tags: one request
    shutil.rmtree(ckpt.parent, ignore_errors=True)  # uploaded and registered: the local copy has done its job
    return str(info.registered_model_version)


def _discard_pending(client: MlflowClient, model_id: str) -> None:
    """Delete the logged model of an upload that gave up (best effort: the server may be the
    component that is down; a resume deletes what is left, ``discard_pending_models``)."""
    try:
        client.delete_logged_model(model_id)
    except Exception as e:  # noqa: BLE001 - the outage is the error to report
        log.debug("could not delete pending logged model %s: %s", model_id, e)


def discard_pending_models(run) -> int:
    """Delete the PENDING logged models of ``run`` that a killed or failed upload left; their epochs
    are trained again and logged anew. Returns how many."""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    pending = [m for m in models if m.status == LoggedModelStatus.PENDING]
    for m in pending:
        client.delete_logged_model(m.model_id)
    if pending:
        log.info("removed %d unfinished logged model(s) of run %s left by an interrupted upload", len(pending), run.info.run_id)
    return len(pending)

