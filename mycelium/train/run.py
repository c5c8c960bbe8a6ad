"""The training core shared by C4, C5 and C6: the fallback ladder and the champion.

``run(cfg)`` loads and splits the data, opens a parent MLflow run, trains the first attempt (the
seed's recipe), climbs the task's fallback ladder when that attempt is weak or collapsed, and
promotes the best epoch to ``champion``. ``train_attempt`` runs one attempt's epochs
(``mycelium.train.loop``) and hands each to the tracking thread (``mycelium.tracking.publish``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from mycelium import distributed
from mycelium.config import TrainConfig, state_root
from mycelium.data.loading import write_rejects_jsonl
from mycelium.metrics import evaluate_predictions
from mycelium.model.blocks import transformer_blocks
from mycelium.model.classifier import count_trainable
from mycelium.serving.package import ModelTemplate
from mycelium.tracking import figure_worker
from mycelium.tracking.lane import Lane
from mycelium.tracking.outage import ResumableFailure, bound_mlflow_http_retries, resume_hint
from mycelium.tracking.publish import (
    discard_pending_models,
    epoch_manifest,
    publish_epoch,
    save_epoch_checkpoint,
)
from mycelium.tracking.registry import (
    Candidate,
    Decision,
    decide_promotion,
    ensure_registered_model,
    tag_version,
)
from mycelium.tracking.runs import (
    child_runs,
    find_resumable,
    log_batch,
    log_datasets,
    log_params_once,
    log_png,
    preflight,
    scrub,
    system_tags,
    training_name,
    ui_url,
    use_experiment,
)
from mycelium.distributed import World
from mycelium.train import search
from mycelium.train.collective import announce, follow, probe_source, run_epoch, start_attempt
from mycelium.train.attempts import (
    Attempt,
    AttemptResult,
    best_of_attempts,
    first_name,
    next_attempt,
)
from mycelium.train.loop import EpochResult, early_stop, score_epoch
from mycelium.train.prepare import Prepared, prepare, resolve_device
from mycelium.train.resume import ResumeState
from mycelium.train.threshold import predict as decide_labels
from mycelium.train.tuning import cpu_tuning, head_only_threads

log = logging.getLogger(__name__)


def train_attempt(prep: Prepared, cfg: TrainConfig, attempt: Attempt, run_id: str, parent_run_id: str,
                  resume: ResumeState | None, lane: Lane) -> AttemptResult:
    """One attempt's epochs. Each epoch's logging and registration goes to ``lane`` (the tracking
    thread) and overlaps the next epoch; the attempt returns once all of them are registered.
    Under data parallelism this is rank 0's side; every step the other ranks share is announced."""
    # The parts of the epochs' pyfunc models that do not change, made on the tracking thread.
    template = lane.submit(ModelTemplate, epoch_manifest(prep, cfg, attempt), cfg.bundle_backbone)
    announce(prep, "attempt", attempt)
    with lane.paused():  # the backbone pass runs alone: a busy second thread slows it on a small CPU
        state = start_attempt(prep, cfg, attempt, resume)
    model, optimizer, scaler = prep.model, state.optimizer, state.scaler
    counts = count_trainable(model)
    mlflow.log_params({"attempt": attempt.name, "unfrozen_layers": attempt.unfrozen_layers, "class_weights": attempt.class_weights,
                       "lr_head": attempt.lr_head or cfg.lr_head,
                       "loss": attempt.loss, "focal_gamma": cfg.focal_gamma if attempt.loss == "focal" else "",
                       "batches_from": state.source.mode, "trainable_params": counts["total"], "trainable_backbone_params": counts["backbone"],
                       **{f"weight_{label}": f"{w:.4f}" for label, w in zip(prep.labels, state.weights)}})

    result = AttemptResult(attempt, run_id, resume.epoch_results() if resume is not None else [])
    start_epoch = state.first_epoch
    run = mlflow.get_run(run_id)  # the tracking thread logs to it by id (MLflow's active run is per thread)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stop_reason := early_stop(result.epochs, cfg.early_stopping, cfg.spec.selection_metric):
                log.info("attempt %s stops before epoch %d: %s", attempt.name, epoch, stop_reason)
                mlflow.set_tags({"stopped_early": "true", "stop_reason": stop_reason})
                break
            lane.check()  # a failed upload of an earlier epoch stops training here
            announce(prep, "epoch", epoch)
            train_loss, probs, val_loss = run_epoch(state, prep, desc=f"{attempt.name} epoch {epoch}/{cfg.epochs}")
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
        # Every job of this attempt has run (or will never run) by now: the template is done with.
        if template.done() and template.exception() is None:
            template.result().close()
    return result


@dataclass
class RunResult:
    parent_run_id: str
    attempts: list[AttemptResult]
    winner: tuple[AttemptResult, EpochResult] | None
    decision: Decision
    labels: list[str]
    ui: str


def run(cfg: TrainConfig) -> RunResult | None:
    """Train a task end to end (see the module docstring); the result names the parent run. Under
    torchrun every rank calls it: rank 0 trains and tracks and returns the result, the other ranks
    follow it (``collective.follow``) and return None."""
    cfg.validate()
    device = resolve_device(cfg)
    world = distributed.start(device.type, cfg.dist_timeout)
    try:
        with cpu_tuning(device):  # decided by the device type alone
            if world.main:
                bound_mlflow_http_retries()
                result = _run(cfg, world)
            else:
                follow(prepare(cfg, world), cfg)
                result = None
    finally:
        figure_worker.shutdown()
    # Only after success: on a failure the process group closes with the process, once rank 0 has
    # said why. Closed earlier, the other ranks fail first and the launcher reports their status.
    distributed.stop(world)
    return result


def _run(cfg: TrainConfig, world: World) -> RunResult:
    figure_worker.start()  # its matplotlib import overlaps data loading
    preflight()
    prep = prepare(cfg, world)
    use_experiment(cfg.experiment)
    ensure_registered_model(cfg.registered_model, cfg.spec.description)

    resumed = find_resumable(cfg.experiment, cfg.task, prep.data.fingerprint) if cfg.resume else None
    if cfg.resume and resumed is None:
        log.warning("resume=true but no unfinished run of %s on this data: starting a new run", cfg.task)
    parent_id = resumed.info.run_id if resumed else None
    # `mlflow run` opens a run (MLFLOW_RUN_ID) in the experiment named on its command line. It becomes
    # the parent when it is in this task's experiment; otherwise the parent goes to the task's
    # experiment (one experiment per task) and the launcher run gets a link to it.
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    launched = launcher is not None
    if launcher and parent_id is None:
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is not None and MlflowClient().get_run(launcher).info.experiment_id == exp.experiment_id:
            parent_id, launcher = launcher, None
    if launcher and resumed is not None:
        _mark_resume_launcher(launcher, resumed)
    # From here on a failure of MLflow or the store ends with the component named and the command
    # that resumes (checkpoints and resume state stay on local disk).
    kept = f"{(state_root() / 'checkpoints').absolute()} (checkpoints) and {(state_root() / 'resume').absolute()} (resume state)"
    explain = lambda error: resume_hint(error, cfg.resume_command(mlflow_run=launched), kept)  # noqa: E731
    try:
        return _train_in_parent(cfg, prep, resumed, parent_id, launcher, explain)
    except Exception as e:
        # Closing the runs on a server that is down fails too: report the first failure.
        first = next((c for c in _chain(e) if isinstance(c, ResumableFailure)), None)
        hinted = first or explain(e)
        if hinted is e:
            raise
        raise hinted from e


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__context__


def _mark_resume_launcher(launcher: str, resumed) -> None:
    """The run `mlflow run` opened for a resume: named and described as such, pointing to the
    training it continues (it stays empty: the training is logged in the resumed run)."""
    name = resumed.info.run_name or resumed.info.run_id
    log_batch(MlflowClient(), launcher, {}, 0, {
        "mlflow.runName": f"resume of {name}", "mycelium_resume_of": resumed.info.run_id,
        "mlflow.note.content": f"`mlflow run` opened this run to resume training run {resumed.info.run_id} ({name}); "
                               f"the training continues in that run: {ui_url(resumed)}"})


def _train_in_parent(cfg: TrainConfig, prep: Prepared, resumed, parent_id: str | None, launcher: str | None, explain) -> RunResult:
    metric = cfg.spec.selection_metric
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else (cfg.run_name or None)) as parent, \
            Lane(paused=True, explain=explain) as lane:
        pid = parent.info.run_id
        if resumed is None:
            # The tags that make the run findable (and resumable) now; the rest on the tracking thread.
            mlflow.set_tags({"task": cfg.task, "data_fingerprint": prep.data.fingerprint, "backbone": prep.info.name,
                             "mycelium_role": "parent", "mycelium_state": "running", **system_tags(),
                             # named for what it is, also when `mlflow run` created it with a random name
                             "mlflow.runName": cfg.run_name or training_name(cfg.task, [first_name(cfg)], parent.info.start_time)})
            lane.submit(_log_parent_start, prep, cfg, pid)
        done = {int(r.data.tags["attempt_index"]): r for r in child_runs(pid, parent.info.experiment_id)
                if r.data.tags.get("mycelium_role") == "attempt"} if resumed else {}

        n_blocks = len(transformer_blocks(prep.model.backbone))
        if 1 in done:  # a resumed run continues the first attempt it chose
            tags = done[1].data.tags
            attempt = Attempt(1, tags["attempt"], int(tags["unfrozen_layers"]), tags["class_weights"], tags["loss"], tags["changed"],
                              float(done[1].data.params.get("lr_head", cfg.lr_head)))
        elif cfg.search == "grid" and cfg.unfrozen_layers == 0:
            attempt = _search_first_attempt(prep, cfg, lane)
        else:
            attempt = Attempt(1, first_name(cfg), cfg.unfrozen_layers, cfg.class_weights, cfg.loss, "seed recipe")
        results: list[AttemptResult] = []
        steps = list(cfg.fallback_steps())
        while attempt is not None:
            results.append(_run_child(prep, cfg, attempt, pid, done.get(attempt.index), lane))
            attempt = None
            while steps and attempt is None:
                attempt = next_attempt(steps.pop(0), results, cfg, n_blocks)
        announce(prep, "done")  # the other ranks' part ends here; the champion is rank 0's alone

        lane.submit(_log_attempts_figure, prep, cfg, results, pid)  # drawn and uploaded while the champion is decided
        winner = best_of_attempts(results, metric)
        candidate = Candidate(winner[1].version, metric, winner[1].report.metrics[metric], prep.data.fingerprint) if winner else None
        decision = decide_promotion(cfg.registered_model, candidate, rescore_champion=lambda v: _rescore(v, prep, cfg),
                                             min_metric=cfg.min_metric)
        _log_parent_end(cfg, results, winner, decision, pid, parent.info.start_time)
        lane.drain()
        mlflow.set_tag("mycelium_state", "done")  # last: a run without it is resumable
        ui = ui_url(parent)
    if launcher:
        MlflowClient().set_tag(launcher, "mycelium_training_run", ui)
        if resumed is not None:
            log.info("resumed training run %s: %s (the run `mlflow run` opened is marked as its resume)", pid, ui)
        else:
            log.info("training logged in experiment %s: %s (pass --experiment-name %s to `mlflow run` to use one run)",
                     cfg.experiment, ui, cfg.experiment)
    ResumeState.clear(pid)
    return RunResult(pid, results, winner, decision, prep.labels, ui)


def _search_first_attempt(prep: Prepared, cfg: TrainConfig, lane: Lane) -> Attempt:
    """The head recipe search (``-P search=grid``) as a ``0-search`` child run; its winner is attempt 1."""
    metric = cfg.spec.selection_metric
    probe = Attempt(1, "search", 0, cfg.class_weights, cfg.loss, "")
    announce(prep, "probe", probe)
    with lane.paused():
        source = probe_source(prep, cfg, probe)  # the cached features the first attempt then reuses
    with head_only_threads(prep.device, head_only=True):
        trials = search.search_heads(prep, cfg, source, metric)
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


def _run_child(prep: Prepared, cfg: TrainConfig, attempt: Attempt, parent_id: str, previous, lane: Lane) -> AttemptResult:
    resume = None
    if previous is not None:
        if previous.data.tags.get("mycelium_state") == "done":
            return ResumeState.finished_attempt(previous, attempt, prep)
        resume = ResumeState.load(parent_id, attempt)
        discard_pending_models(previous)
    run_name = f"{attempt.index}-{attempt.name}"
    with mlflow.start_run(run_id=previous.info.run_id if previous else None, run_name=None if previous else run_name, nested=True) as child:
        if previous is None:
            mlflow.set_tags({"attempt_index": attempt.index, "attempt": attempt.name, "changed": attempt.changed,
                             "unfrozen_layers": attempt.unfrozen_layers, "class_weights": attempt.class_weights, "loss": attempt.loss,
                             "task": cfg.task, "data_fingerprint": prep.data.fingerprint, "mycelium_role": "attempt"})
        result = train_attempt(prep, cfg, attempt, child.info.run_id, parent_id, resume, lane)
        best = result.best(cfg.spec.selection_metric)
        mlflow.set_tags({"best_epoch": best.epoch if best else "none", "mycelium_state": "done",
                         "attempt_collapsed": str(best is None).lower()})
    return result


def _rescore(champion_version, prep: Prepared, cfg: TrainConfig) -> float | None:
    """The current champion's selection metric on this run's validation data (it was trained on other data)."""
    from mycelium.serving.checkpoint import (
        clear_backbone_cache,
        load_checkpoint,
        predict_proba,
    )

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
    return None if report.collapsed else report.metrics[cfg.spec.selection_metric]


def _log_parent_start(prep: Prepared, cfg: TrainConfig, run_id: str) -> None:
    """Params, the class distribution (metrics, JSON, bar chart) and rejected records of the parent
    run, by run id: it runs on the tracking thread (after the first backbone pass)."""
    client = MlflowClient()
    params = cfg.params()
    params.update({"precision_resolved": prep.precision, "device_resolved": str(prep.device), "world_size_resolved": prep.world.size, "token_budget_resolved": prep.token_budget,
                   "pass_token_budget_resolved": prep.pass_budget,
                   "cache_memory_gb_resolved": prep.cache_memory_gb,
                   "backbone_revision": prep.info.revision,
                   "backbone_architecture": prep.info.architecture, "pooling": prep.model.pooling, "labels": ",".join(prep.labels),
                   "selection_metric": cfg.spec.selection_metric, "n_train": len(prep.split.train), "n_val": len(prep.split.val),
                   **{k: v for k, v in prep.data.summary().items() if k != "labels"}})
    log_params_once(scrub({k: str(v)[:6000] for k, v in params.items()}), run_id)
    fields = list(cfg.spec.input_fields)
    log_datasets(client, run_id, cfg.task, prep.data.uri, prep.data.fingerprint, {
        context: pd.DataFrame([dict(zip(fields, r.inputs), label=r.label) for r in records], columns=[*fields, "label"])
        for context, records in (("training", prep.split.train), ("validation", prep.split.val))})
    # Class distribution before training: metrics, a JSON and a bar chart.
    counts = {s: dict(c) for s, c in prep.split.counts.items() if sum(c.values())}
    metrics = {}
    for split_name, per_label in counts.items():
        total = sum(per_label.values())
        metrics.update({f"{split_name}_count_{k}": float(v) for k, v in per_label.items()})
        metrics.update({f"{split_name}_share_{k}": v / total for k, v in per_label.items()})
    if prep.data.rejects:
        metrics["data_skipped"] = float(prep.data.n_skipped)
        metrics["data_unreadable_files"] = float(prep.data.n_unreadable_files)
    log_batch(client, run_id, metrics, 0, {})
    client.log_text(run_id, json.dumps({"counts": counts, "warnings": prep.split.warnings}, indent=2), "data/class_distribution.json")
    log_png(client, run_id, figure_worker.png("class_distribution", counts=counts, title=f"{cfg.task} class distribution"),
                     "data/class_distribution.png")
    if prep.data.rejects:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "rejected_records.jsonl"
            write_rejects_jsonl(prep.data.rejects, path)
            client.log_artifact(run_id, str(path), "data")


def _log_attempts_figure(prep: Prepared, cfg: TrainConfig, results: list[AttemptResult], run_id: str) -> None:
    """Each attempt's best epoch side by side (per-class F1, predicted vs true distribution), by run id."""
    metric = cfg.spec.selection_metric
    attempts = {}
    for r in results:
        best = r.best(metric) or max(r.epochs, key=lambda e: e.report.metrics[metric])
        attempts[f"{r.attempt.index}-{r.attempt.name}"] = best.report.metrics
    log_png(MlflowClient(), run_id, figure_worker.png("attempts", attempts=attempts, labels=prep.labels),
                     "attempts_comparison.png")


def _log_parent_end(cfg: TrainConfig, results: list[AttemptResult], winner, decision: Decision, run_id: str,
                    started_ms: int) -> None:
    """The winner and the promotion decision: parent run tags, its name (the attempts it ran) and the
    winner's headline metrics in one request, so the runs table compares trainings unexpanded."""
    metric = cfg.spec.selection_metric
    tags = decision.as_tags()
    if not cfg.run_name:
        tags["mlflow.runName"] = training_name(cfg.task, [r.attempt.name for r in results], started_ms)
    metrics = {"attempts": float(len(results)), "collapsed": float(winner is None)}
    if winner:
        r, e = winner
        tags.update({"winner_attempt": f"{r.attempt.index}-{r.attempt.name}", "winner_run_id": r.run_id,
                     "winner_epoch": str(e.epoch), "winner_version": str(e.version)})
        metrics.update({f"best_{metric}": e.report.metrics[metric], "best_macro_f1": e.report.metrics["macro_f1"]})
        # The version already carries its run, attempt and epoch (registration tags): it gets the decision only.
        tag_version(cfg.registered_model, e.version, decision.as_tags())
    else:
        tags["winner_attempt"] = "none (all collapsed)"
    log_batch(MlflowClient(), run_id, metrics, 0, tags)

