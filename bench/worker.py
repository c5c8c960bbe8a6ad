"""One contender's run of one bench configuration, in its own process (so peak memory is per run).

    python bench/worker.py JOB.json

``JOB.json`` is a ``common.Job``; the result (wall times per phase, peak RSS, final metrics) is
written to ``job.result`` as JSON. ``bench/run.py`` starts these; they can be run by hand too.

Contenders:

* ``ours``  — ``mycelium.train.run(cfg)``: exactly what ``mlflow run . -e cX`` runs, MLflow
  tracking, per-epoch checkpoints and model registration included, against the stack named by
  the environment. A per-phase breakdown is taken by wrapping the functions ``run`` calls
  (exclusive times: a wrapped call inside another one is not counted twice).
* ``peer``  — the Hugging Face ``Trainer`` at its best settings for this job (see ``run_peer``).
* ``lower`` — the lower bound: one inference-mode forward pass over train + validation with
  dynamic padding in length-sorted batches (on a CPU, two batches at a time, as ours runs them).

All three read the same data through ``mycelium.data.loading`` and split it the same way.
"""

from __future__ import annotations

import threading
import time

T_PROCESS = time.time()  # before the heavy imports: import time is part of every contender's cost

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The mycelium next to this bench, not whichever copy is installed: a bench measures its own checkout.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import Job, own_cpu_seconds, peak_rss_mib  # noqa: E402

log = logging.getLogger("bench.worker")


# ---------------------------------------------------------------------------------------------
# Exclusive-time phase accounting


class Phases:
    """Wraps functions so each call's time is booked to a label, minus the time of wrapped calls
    nested inside it (so phases add up to the total without double counting). Calls on other
    threads (ours' tracking thread) are booked apart, in ``background``: they overlap the main
    thread's phases instead of adding to the wall time."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.background: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    @property
    def _stack(self) -> list[list]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def book(self, label: str, seconds: float) -> None:
        self.totals[label] += seconds
        self.counts[label] += 1

    def timed(self, label: str, fn):
        phases = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            phases._stack.append([label, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                _, nested = phases._stack.pop()
                main = threading.current_thread() is threading.main_thread()
                (phases.totals if main else phases.background)[label] += dt - nested
                phases.counts[label] += 1
                if phases._stack:
                    phases._stack[-1][1] += dt

        return wrapper

    def wrap(self, owner, attr: str, label: str) -> None:
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        if isinstance(raw, (classmethod, staticmethod)):
            fn = getattr(owner, attr)  # bound (classmethod) or plain (staticmethod) function
            self._saved.append((owner, attr, raw))
            setattr(owner, attr, staticmethod(self.timed(label, fn)))
            return
        fn = getattr(owner, attr)
        self._saved.append((owner, attr, fn))
        setattr(owner, attr, self.timed(label, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()


# ---------------------------------------------------------------------------------------------
# Shared: the data every contender trains or runs on


def load_split(job: Job):
    from mycelium.config import TrainConfig
    from mycelium.data.loading import load_task_data
    from mycelium.data.split import split_records

    spec = TrainConfig(task=job.task, inputs=job.inputs).spec  # the input composition as ours reads it
    data = load_task_data(job.data, spec, progress=False)
    split = split_records(data.records, data.labels, val_fraction=job.val_fraction, seed=job.seed)
    return spec, data, split


def texts_of(records, spec) -> list[str]:
    from mycelium.text import join_inputs

    return [join_inputs(r.inputs, spec.separator) for r in records]


def final_metrics(reports: list, key: str) -> dict:
    """``{"final": metric of the last epoch, "best": best epoch's, "best_epoch": n, ...}``."""
    values = [r.metrics[key] for r in reports]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    last = reports[-1]
    return {
        "metric": key,
        "final": values[-1],
        "best": values[best],
        "best_epoch": best + 1,
        "final_accuracy": last.metrics["accuracy"],
        "final_macro_f1": last.metrics["macro_f1"],
        "final_collapsed": bool(last.collapsed),
        "per_epoch": values,
    }


def selection_metric(task: str) -> str:
    from mycelium.tasks import get_task

    return get_task(task).selection_metric


# ---------------------------------------------------------------------------------------------
# ours


def run_ours(job: Job, stamps: dict) -> dict:
    os.environ["MYCELIUM_STATE"] = str(Path(job.workdir) / "state")
    import mlflow

    from mycelium.cache import store
    from mycelium.config import config_from_args
    from mycelium.serving import package as serving
    from mycelium.tracking import figure_worker, lane, publish
    from mycelium.train import prepare as prepare_mod
    from mycelium.train import run as run_mod
    from mycelium.train import sources
    from mycelium.train.resume import ResumeState

    stamps["imports_done"] = time.time()
    args = [
        "--data", job.data, "--backbone", job.backbone, "--epochs", str(job.epochs), "--batch-size", str(job.batch_size),
        "--max-length", str(job.max_length), "--unfrozen-layers", str(job.unfrozen_layers),
        "--lr-head", str(job.lr_head), "--lr-backbone", str(job.lr_backbone), "--weight-decay", str(job.weight_decay),
        "--class-weights", job.class_weights, "--weight-clip", str(job.weight_clip), "--dropout", str(job.dropout),
        "--seed", str(job.seed), "--val-fraction", str(job.val_fraction),
        "--device", job.device, "--precision", "auto",
        # The peer has no fallback ladder: one attempt of the same epochs on both sides.
        "--fallbacks", "none",
    ]
    cfg = config_from_args(args, job.task)

    ph = Phases()
    w = ph.wrap
    # Setup and end of the MLflow run.
    # Each function is wrapped where it is looked up: the module that imports it by name.
    w(run_mod, "preflight", "run setup: preflight, experiment, registered model")
    w(mlflow, "set_experiment", "run setup: preflight, experiment, registered model")
    w(run_mod, "ensure_registered_model", "run setup: preflight, experiment, registered model")
    w(run_mod, "_log_parent_start", "run setup: params, class distribution json+png")
    w(mlflow, "start_run", "run setup: start parent/child runs")
    w(mlflow.tracking.fluent, "end_run", "end: close runs")
    w(run_mod, "_log_parent_end", "end: winner tags and metrics")
    w(run_mod, "_log_attempts_figure", "end: attempts figure (matplotlib + upload)")
    w(run_mod, "decide_promotion", "end: champion decision + alias")
    w(ResumeState, "clear", "end: close runs")
    # Preparation.
    w(run_mod, "prepare", "prepare: split, model build, labels")
    w(prepare_mod, "load_task_data", "data load (S3 -> records)")
    w(prepare_mod, "load_backbone", "backbone load")
    w(prepare_mod, "encode_rows", "tokenize")
    # The one backbone pass and its cache.
    w(sources, "compute_pooled", "backbone pass (pooled features / prefix states)")
    w(sources, "compute_prefix", "backbone pass (pooled features / prefix states)")
    w(sources, "pooled_from_prefix", "backbone pass (pooled features / prefix states)")
    w(store.FeatureCache, "save", "feature cache write/read")
    w(store.FeatureCache, "load", "feature cache write/read")
    # Epochs.
    w(run_mod, "train_attempt", "training steps (head / trainable blocks)")
    w(run_mod, "evaluate", "validation pass per epoch")
    w(run_mod, "evaluate_predictions", "validation pass per epoch")
    w(publish, "log_epoch", "per-epoch tracking: metrics, confusion json, tags")
    w(figure_worker, "png", "figures: waiting for the helper process to draw")
    w(publish, "upload_folder", "per-epoch tracking: confusion json + png upload")
    w(publish, "start_logged_model", "per-epoch checkpoint: create logged model")
    w(publish, "save_checkpoint", "per-epoch checkpoint: save safetensors")
    w(publish, "log_checkpoint", "per-epoch checkpoint: pyfunc save + upload")
    w(serving, "register_version", "per-epoch checkpoint: register version (+ tags)")
    w(run_mod, "tag_version", "model version tags set one by one")
    w(ResumeState, "save", "per-epoch resume state save")
    w(run_mod, "save_epoch_checkpoint", "per-epoch checkpoint: save safetensors")
    w(lane.Lane, "drain", "waiting for the tracking thread (uploads not overlapped)")
    w(lane.Lane, "close", "waiting for the tracking thread (uploads not overlapped)")
    w(run_mod, "run", "run(): other (unwrapped code)")

    profiler = None
    if job.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    result = run_mod.run(cfg)
    total = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(Path(job.workdir) / "ours.prof"))
    ph.restore()

    attempt = result.attempts[0]
    reports = [e.report for e in attempt.epochs]
    versions = [e.version for e in attempt.epochs]
    return {
        "phases": dict(ph.totals),
        "background_phases": dict(ph.background),
        "phase_counts": dict(ph.counts),
        "run_seconds": total,
        "metrics": final_metrics(reports, selection_metric(job.task)),
        "versions_registered": sum(v is not None for v in versions),
        "champion": result.decision.as_tags() if result.decision else {},
    }


# ---------------------------------------------------------------------------------------------
# peer: the Hugging Face Trainer at its best settings for this job


def run_peer(job: Job, stamps: dict, keep: dict | None = None) -> dict:
    """The peer's run; ``keep`` (bench/quality) receives the trained Trainer, its encoder and the split."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.modeling_outputs import SequenceClassifierOutput

    from mycelium.metrics import evaluate_predictions
    from mycelium.model.backbone import load_backbone
    from mycelium.model.blocks import apply_freezing
    from mycelium.model.classifier import Classifier, param_groups
    from mycelium.train.losses import class_weights

    stamps["imports_done"] = time.time()
    phases: dict[str, float] = defaultdict(float)

    def lap(label: str, t0: float) -> float:
        t = time.perf_counter()
        phases[label] += t - t0
        return t

    t = time.perf_counter()
    spec, data, split = load_split(job)
    labels = list(data.labels)
    index = {name: i for i, name in enumerate(labels)}
    y_train = [index[r.label] for r in split.train]
    y_val = [index[r.label] for r in split.val]
    t = lap("data load (S3 -> records)", t)

    backbone, tokenizer, info = load_backbone(job.backbone)
    t = lap("backbone load", t)

    # Tokenize once, unpadded; DataCollatorWithPadding pads each batch to its longest row.
    def encode(records, ys):
        enc = tokenizer(texts_of(records, spec), truncation=True, max_length=job.max_length, padding=False,
                        return_attention_mask=False)
        return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], ys)]

    train_ds, val_ds = encode(split.train, y_train), encode(split.val, y_val)
    t = lap("tokenize", t)

    # The same architecture as ours: mycelium's Classifier (backbone -> pooling -> head).
    torch.manual_seed(job.seed)
    clf = Classifier(backbone, len(labels), pooling=info.pooling, dropout=job.dropout)
    torch.manual_seed(job.seed + 1)  # ours' first attempt re-initialises the head with seed + 1
    clf.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    # Frozen backbone (requires_grad False) except, for C6, the last blocks and the final norm.
    apply_freezing(clf.backbone, job.unfrozen_layers)
    device = torch.device(job.device)
    clf.to(device)

    class PeerModel(nn.Module):
        """What Trainer expects: forward(**batch) -> an output with ``logits``."""

        def __init__(self, classifier):
            super().__init__()
            self.clf = classifier

        def forward(self, input_ids, attention_mask, labels=None):
            return SequenceClassifierOutput(logits=self.clf(input_ids, attention_mask))

        def train(self, mode: bool = True):
            # Trainer calls model.train() before every step; Classifier.train walks every backbone
            # module to keep frozen ones in eval mode (~35 ms on a 24-block model). Do it only when
            # the mode changes, so the peer does not pay for our model class's bookkeeping.
            if getattr(self, "_mode", None) is not mode:
                self._mode = mode
                super().train(mode)
            return self

    model = PeerModel(clf)
    weights = torch.tensor(class_weights(y_train, len(labels), job.class_weights, clip=job.weight_clip, label_names=labels),
                           dtype=torch.float32, device=device)

    def weighted_loss(outputs, labels_, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits.float(), labels_, weight=weights)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        report = evaluate_predictions(pred.label_ids, logits.argmax(-1), labels, spec.minority_label)
        reports.append(report)
        return {"macro_f1": report.metrics["macro_f1"], "accuracy": report.metrics["accuracy"],
                **({"minority_f1": report.metrics["minority_f1"]} if "minority_f1" in report.metrics else {})}

    reports: list = []
    on_gpu = device.type == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(Path(job.workdir) / "trainer"),
        num_train_epochs=job.epochs,
        per_device_train_batch_size=job.batch_size,
        # Eval batch = train batch: on this CPU larger batches run slower per row (cache effects).
        per_device_eval_batch_size=job.eval_batch_size or job.batch_size,
        train_sampling_strategy="group_by_length",  # transformers 5's spelling of group_by_length=True
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to="none",
        # 0 on a 2-core CPU: worker processes would compete with the forward pass's two intra-op
        # threads, and collating pre-tokenized rows costs microseconds. On a GPU machine a few
        # workers would not help either: there is nothing to prepare but padding.
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        lr_scheduler_type="constant",  # ours keeps the learning rates constant
        max_grad_norm=0.0,  # ours does not clip gradients
        seed=job.seed,
        use_cpu=not on_gpu,
        bf16=bf16,
        fp16=on_gpu and not bf16,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
    )

    class Stamps(TrainerCallback):
        def __init__(self):
            self.t = time.perf_counter()

        def _lap(self, label):
            now = time.perf_counter()
            phases[label] += now - self.t
            self.t = now

        def on_train_begin(self, *a, **k):
            self._lap("trainer setup (init, optimizer, accelerate)")

        def on_epoch_begin(self, *a, **k):
            self._lap("trainer setup (init, optimizer, accelerate)")

        def on_epoch_end(self, *a, **k):
            self._lap("training steps (full forward + backward)")

        def on_evaluate(self, *a, **k):
            self._lap("evaluate per epoch (full forward)")

        def on_save(self, *a, **k):
            self._lap("save per epoch (model + optimizer + rng)")

        def on_train_end(self, *a, **k):
            self._lap("end")

    stamps_cb = Stamps()
    stamps_cb.t = t
    # Head at lr_head, trainable blocks at lr_backbone: the same AdamW groups as ours.
    # fused, as ours (and as the Trainer's own default optimizer, adamw_torch_fused).
    optimizer = torch.optim.AdamW(param_groups(clf, job.lr_head, job.lr_backbone, job.weight_decay), fused=True)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        compute_loss_func=weighted_loss,
        compute_metrics=compute_metrics,
        callbacks=[stamps_cb],
        optimizers=(optimizer, None),
    )
    trainer.train()
    if keep is not None:  # bench/quality scores the final model on its test split
        keep.update(trainer=trainer, encode=encode, spec=spec, split=split, labels=labels)
    phases["end"] += time.perf_counter() - stamps_cb.t
    trainable = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    return {
        "phases": dict(phases),
        "metrics": final_metrics(reports, selection_metric(job.task)),
        "trainable_params": trainable,
        "n_train": len(train_ds),
        "n_val": len(val_ds),
    }


# ---------------------------------------------------------------------------------------------
# lower bound: one forward pass over train + validation


def run_lower(job: Job, stamps: dict) -> dict:
    import torch

    from mycelium.cache.passes import for_each_batch
    from mycelium.model.backbone import load_backbone
    from mycelium.model.classifier import Classifier

    stamps["imports_done"] = time.time()
    phases: dict[str, float] = defaultdict(float)
    t = time.perf_counter()
    spec, data, split = load_split(job)
    phases["data load (S3 -> records)"] += time.perf_counter() - t
    t = time.perf_counter()
    backbone, tokenizer, info = load_backbone(job.backbone)
    device = torch.device(job.device)
    model = Classifier(backbone, len(data.labels), pooling=info.pooling).to(device).eval()
    phases["backbone load"] += time.perf_counter() - t
    t = time.perf_counter()
    texts = texts_of(split.train, spec) + texts_of(split.val, spec)
    ids = tokenizer(texts, truncation=True, max_length=job.max_length, padding=False, return_attention_mask=False)["input_ids"]
    phases["tokenize"] += time.perf_counter() - t

    t = time.perf_counter()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, current = [], []
    for i in order:  # longest-so-far x rows under the token budget, at most 256 rows
        if current and (len(ids[i]) * (len(current) + 1) > job.token_budget or len(current) >= 256):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    pad = tokenizer.pad_token_id
    left = tokenizer.padding_side == "left"

    def forward(batch: list[int]) -> tuple[int, int]:
        longest = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(ids[i])
            sl = slice(longest - n, longest) if left else slice(0, n)
            input_ids[row, sl] = torch.as_tensor(ids[i])
            mask[row, sl] = 1
        # inference_mode and autocast are per thread: entered here, on whichever thread runs the batch.
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model.encode(input_ids.to(device), mask.to(device))
        return int(mask.sum()), longest * len(batch)

    # The lower bound gets ours' CPU schedule too (two batches at a time, half the intra-op
    # threads each, ~10% faster than one batch on all of them on 2 cores): a bound ours could
    # beat would not be a bound. On a GPU, one batch after another.
    counts = list(for_each_batch(batches, forward, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    real, padded = sum(c[0] for c in counts), sum(c[1] for c in counts)
    phases["backbone pass (train + val, once)"] += time.perf_counter() - t
    return {"phases": dict(phases), "texts": len(ids), "real_tokens": real, "padded_tokens": padded,
            "batches": len(batches)}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    job = Job.load(argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["MYCELIUM_CACHE"] = job.cache_dir
    Path(job.workdir).mkdir(parents=True, exist_ok=True)
    spawned = float(os.environ.get("BENCH_SPAWNED_AT", T_PROCESS))
    stamps: dict[str, float] = {}
    runner = {"ours": run_ours, "peer": run_peer, "lower": run_lower}[job.contender]
    out = runner(job, stamps)
    end = time.time()
    import torch

    out.update({
        "contender": job.contender,
        "config": job.config,
        "wall_seconds": end - spawned,
        "startup_imports_seconds": stamps.get("imports_done", T_PROCESS) - spawned,
        "work_seconds": end - stamps.get("imports_done", T_PROCESS),
        "peak_rss_mib": peak_rss_mib(),
        "cpu_seconds": own_cpu_seconds(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / (1 << 20) if torch.cuda.is_available() else None,
    })
    Path(job.result).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
