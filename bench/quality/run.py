"""Quality bench: what each training recipe scores on held-out problem templates.

    python bench/quality/run.py            # every task and recipe, writes bench/quality/results.md
    python bench/quality/run.py --quick    # tiny data, 2 epochs: a smoke test of the whole pipeline

It builds the template-split data sets (``bench/quality/data.py``), starts its own embedded stack
(SeaweedFS S3 + MLflow server, as ``bench/run.py`` does) on free loopback ports, uploads each
task's folder to ``s3://mycelium-data/quality/<task>/``, and trains every task x recipe in its own
process through ``mycelium.train.run.run(cfg)`` — exactly what ``mlflow run . -e cX`` runs, so version
registration and the champion decision are part of what is checked — each recipe into its own
registered model. The process then loads the winning version with ``mycelium.load`` and scores it
on the test split (templates never seen in training or validation). The peer is the Hugging Face
Trainer as ``bench/worker.py`` runs it, scored on the same test split. See ``bench/quality/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# The mycelium of this checkout (not whichever copy is installed), and bench/'s modules under the
# top-level names bench/run.py and bench/worker.py import each other by.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import Job, machine_description, own_cpu_seconds, peak_rss_mib  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The recipes: the one table of what each row trains with (argv for mycelium.config.config_from_args)

# The seed's recipe as the task table (mycelium/tasks.py) gave it when this bench was written,
# pinned here so that changing the project's defaults moves the `default` row only.
SEED_TABLE: dict[str, list[str]] = {
    "c4": ["--unfrozen-layers", "0", "--class-weights", "balanced", "--loss", "ce", "--lr-head", "1e-3",
           "--lr-backbone", "2e-5", "--epochs", "5", "--fallbacks", "unfreeze"],
    "c5": ["--unfrozen-layers", "0", "--class-weights", "balanced", "--loss", "ce", "--lr-head", "1e-3",
           "--lr-backbone", "2e-5", "--epochs", "5", "--fallbacks", "unfreeze"],
    "c6": ["--unfrozen-layers", "4", "--class-weights", "clipped", "--weight-clip", "5", "--loss", "ce",
           "--lr-head", "1e-3", "--lr-backbone", "2e-5", "--epochs", "5", "--fallbacks", "sqrt_inv,focal"],
}
# "Seed everything else": the seed had none of these knobs, so they are set to what it did — its
# input fields, argmax decisions, constant learning rates, no early stopping, no recipe search.
SEED_INPUTS = {"c4": "step_i,step_j", "c5": "step_i,step_j", "c6": "problem"}
SEED_ARGS: dict[str, list[str]] = {
    task: ["--inputs", fields, "--threshold", "none", "--lr-schedule", "constant", "--warmup-ratio", "0",
           "--early-stopping", "0", "--search", "none", "--numbers", "keep"]
    for task, fields in SEED_INPUTS.items()
}


def args_of(*parts: list[str]) -> list[str]:
    """``--name value`` lists merged left to right: a later value replaces an earlier one."""
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(zip(part[::2], part[1::2]))
    return [x for pair in merged.items() for x in pair]


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    args: dict[str, list[str]] | None  # per training task; None: the peer (HF Trainer, bench/worker.run_peer)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("plain", "plain CE, no class weights, no fallbacks (the seed's known failure)",
           {t: args_of(SEED_TABLE[t], SEED_ARGS[t], ["--class-weights", "none", "--loss", "ce", "--fallbacks", "none"])
            for t in SEED_TABLE}),
    Recipe("seed", "the seed's recipe (task table at the time of writing, fallback ladder on)",
           {t: args_of(SEED_TABLE[t], SEED_ARGS[t]) for t in SEED_TABLE}),
    Recipe("default", "the project's current defaults (no recipe arguments)", {t: [] for t in SEED_TABLE}),
    Recipe("peer", "HF Trainer as bench/ runs it, the seed's class weights, final epoch", None),
    Recipe("seed+numbers", "the seed's recipe (fallback ladder on) with numbers mapped to symbols N1, N2, ... per record",
           {t: args_of(SEED_TABLE[t], SEED_ARGS[t], ["--numbers", "symbols"]) for t in SEED_TABLE}),
)}
# The ablation: the seed's first attempt (no fallback ladder, so a row is one frozen or partly
# frozen attempt) plus one feature at a time (--ablation adds these rows).
CONTEXT_INPUTS = {"c4": "problem,step_i,step_j", "c5": "problem,step_i,step_j", "c6": "problem"}
# Every field the task's labelling rule looks at (structural.py): C4 counts numbers of the problem
# text and of all earlier results as known.
RULE_INPUTS = CONTEXT_INPUTS | {"c4": "problem,earlier_steps,step_j"}
ABLATION: dict[str, tuple[str, dict[str, list[str]]]] = {
    "seed-1": ("the seed's first attempt alone (no fallback ladder): the ablation's baseline", {t: [] for t in SEED_TABLE}),
    "+inputs": ("seed-1 + problem text as context (cut first when too long)", {t: ["--inputs", CONTEXT_INPUTS[t]] for t in SEED_TABLE}),
    "+threshold": ("seed-1 + decision threshold tuned on validation", {t: ["--threshold", "auto"] for t in SEED_TABLE}),
    "+logit_adjusted": ("seed-1 with logit-adjusted CE (tau 1) instead of class weights",
                        {t: ["--class-weights", "none", "--loss", "logit_adjusted"] for t in SEED_TABLE}),
    "+effective": ("seed-1 with effective-number class weights (beta 0.999)", {t: ["--class-weights", "effective"] for t in SEED_TABLE}),
    "+schedule": ("seed-1 + linear decay after 10% warmup, early stopping (patience 2)",
                  {t: ["--lr-schedule", "linear", "--warmup-ratio", "0.1", "--early-stopping", "2"] for t in SEED_TABLE}),
    "pool=last": ("seed-1 pooled at the last real token",
                  {t: ["--pooling", "last"] for t in SEED_TABLE}),
    "pool=mean": ("seed-1 mean-pooled over real tokens (the default)", {t: ["--pooling", "mean"] for t in SEED_TABLE}),
    "+numbers": ("seed-1 with numbers mapped to symbols N1, N2, ... per record (the same value, the same symbol)",
                 {t: ["--numbers", "symbols"] for t in SEED_TABLE}),
    "+search": ("seed-1 + tuned threshold + head recipe search (24 recipes, chosen on validation)",
                {t: ["--threshold", "auto", "--search", "grid"] for t in SEED_TABLE}),
}
# Rows run by --recipes only (not --ablation): C4's context exploration (bench/quality/c4-context.md)
# and a full fine-tune on mapped numbers (bench/quality/limits.md).
RULE_ARGS = {t: ["--inputs", RULE_INPUTS[t], "--numbers", "symbols", "--max-length", "256"] for t in SEED_TABLE}
BY_NAME: dict[str, tuple[str, dict[str, list[str]]]] = {
    "+context": ("seed-1 reading what the label's rule reads (C4: problem, every earlier step, step_j), numbers "
                 "mapped to symbols, 256 tokens", RULE_ARGS),
    "+context+unfreeze": ("+context with the last 4 blocks trainable from the first attempt",
                          {t: RULE_ARGS[t] + ["--unfrozen-layers", "4"] for t in SEED_TABLE}),
    "+numbers+finetune": ("seed-1 with numbers mapped to symbols and all 6 of MiniLM's blocks trainable (lr 5e-5)",
                          {t: ["--numbers", "symbols", "--unfrozen-layers", "6", "--lr-backbone", "5e-5"] for t in SEED_TABLE}),
}
RECIPES.update({name: Recipe(name, title, {t: args_of(SEED_TABLE[t], SEED_ARGS[t], ["--fallbacks", "none"], extra[t])
                                           for t in SEED_TABLE})
                for name, (title, extra) in (ABLATION | BY_NAME).items()})
MAIN_RECIPES = ("plain", "seed", "default", "peer")

TASKS = ("c4", "c4_2.6pct", "c5", "c6")
# --quick covers both code paths in half the runs: binary with a frozen backbone (at 2.6% BRIDGING
# on tiny data it also takes the no-winner path) and multi-class with unfrozen blocks.
QUICK_TASKS = ("c4_2.6pct", "c6")
METRIC_NAMES = {"c4": "BRIDGING F1", "c5": "DEPENDS F1", "c6": "macro F1"}
BACKBONE_NAMES = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M"}  # packaged aliases; others by name


def train_task(task: str) -> str:
    """The task a data folder trains as: ``c4_2.6pct`` is C4 on a subsampled folder."""
    return task.split("_", 1)[0]


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# One training (a child process): ours through mycelium.train.run, or the peer


@dataclass
class QualityJob:
    task: str  # data folder name (c4_2.6pct, ...)
    train_task: str  # c4 | c5 | c6
    recipe: str
    data: str  # s3:// prefix of the task's folder
    backbone: str
    argv: list[str]  # ours: the full config_from_args argv (recipe + harness args)
    workdir: str
    cache_dir: str
    result: str
    peer: dict = field(default_factory=dict)  # the peer: a bench common.Job as a dict

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> QualityJob:
        return cls(**json.loads(Path(path).read_text()))


def test_split(data_uri: str, spec, val_fraction: float, seed: int):
    """The test records of ``data_uri`` read with ``spec`` (its input fields, in its order)."""
    from mycelium.data.loading import load_task_data
    from mycelium.data.split import split_records

    data = load_task_data(data_uri, spec, progress=False)
    return split_records(data.records, data.labels, val_fraction=val_fraction, seed=seed).test


def score(y_true: list[str], y_pred: list[str], labels: list[str], spec, collapse_dominance: float = 0.9) -> dict:
    """Test metrics of label strings: the selection metric, macro F1, predicted shares, collapse."""
    from mycelium.metrics import evaluate_predictions, metric_key

    labels = list(labels) + sorted(set(y_true) - set(labels))  # a test-only class still counts against the model
    report = evaluate_predictions(y_true, y_pred, labels, spec.minority_label, collapse_dominance)
    m = report.metrics
    key = "minority_f1" if spec.minority_label else "macro_f1"
    return {
        "n": len(y_true), "selection_metric": key, "selection": m[key], "macro_f1": m["macro_f1"],
        "accuracy": m["accuracy"], "collapsed": report.collapsed,
        "collapse_reasons": getattr(report, "collapse_reasons", []),
        "pred_share": {lab: m[metric_key("pred_share", lab)] for lab in labels},
        "true_share": {lab: m[metric_key("true_share", lab)] for lab in labels},
        "labels": labels, "confusion": report.confusion,
    }


def score_version(cfg, version: str) -> dict:
    """A registered version loaded as a downstream service would (``mycelium.load``), scored on the
    test split; its labels are what ``predict`` returns (the checkpoint's decision rule)."""
    import mycelium

    model = mycelium.load(cfg.task, version=version, registered_model=cfg.registered_model)
    # Read the records with the fields the model was trained on, in the manifest's order.
    spec = dataclasses.replace(cfg.spec, input_fields=tuple(model.input_fields),
                               allow_empty=tuple(model.manifest.get("allow_empty", cfg.spec.allow_empty)))
    test = test_split(cfg.data, spec, cfg.val_fraction, cfg.seed)
    preds = model.predict([dict(zip(model.input_fields, r.inputs)) for r in test])
    out = score([r.label for r in test], [p.label for p in preds], model.labels, spec, cfg.collapse_dominance)
    out.update(version=version, threshold=model.manifest.get("threshold"), input_fields=model.input_fields)
    return out


def run_ours(job: QualityJob) -> dict:
    os.environ["MYCELIUM_STATE"] = str(Path(job.workdir) / "state")
    from mycelium.config import config_from_args
    from mycelium.train.run import run as train

    cfg = config_from_args(job.argv, job.train_task)
    result = train(cfg)
    metric = cfg.spec.selection_metric
    out: dict = {
        "attempts": [{"name": f"{a.attempt.index}-{a.attempt.name}", "epochs": len(a.epochs),
                      "val": [e.report.metrics[metric] for e in a.epochs],
                      "collapsed": [e.report.collapsed for e in a.epochs]} for a in result.attempts],
        "flagged_collapsed": result.winner is None,
        "decision": result.decision.as_tags(),
        "promoted": result.decision.promoted,
        "params": {k: v for k, v in cfg.params().items() if k not in ("data", "registered_model", "experiment")},
    }
    if result.winner is not None:
        attempt, epoch = result.winner
        out["winner"] = {"attempt": f"{attempt.attempt.index}-{attempt.attempt.name}", "epoch": epoch.epoch,
                         "version": epoch.version, "val": epoch.report.metrics[metric],
                         "val_macro_f1": epoch.report.metrics["macro_f1"]}
        out["test"] = score_version(cfg, epoch.version)
    else:
        # For information only: the first attempt's last epoch, which nothing would ever serve.
        last = result.attempts[0].epochs[-1]
        out["last_epoch"] = {"attempt": f"1-{result.attempts[0].attempt.name}", "epoch": last.epoch,
                             "version": last.version, "val": last.report.metrics[metric]}
        out["test"] = score_version(cfg, last.version)
    return out


def run_peer_job(job: QualityJob) -> dict:
    import worker as bench_worker  # bench/worker.py

    peer = Job(**job.peer)
    kept: dict = {}
    res = bench_worker.run_peer(peer, {}, keep=kept)
    trainer, split, labels = kept["trainer"], kept["split"], kept["labels"]
    spec = kept["spec"]
    # The test split through the peer's own tokenization and its Trainer's predict; labels only feed
    # the Trainer's test loss, so a class training never saw gets a placeholder (scored below by name).
    index = {name: i for i, name in enumerate(labels)}
    logits = trainer.predict(kept["encode"](split.test, [index.get(r.label, 0) for r in split.test])).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = [labels[i] for i in logits.argmax(-1)]
    m = res["metrics"]
    return {
        "flagged_collapsed": bool(m["final_collapsed"]),
        "winner": {"attempt": "Trainer, final epoch", "epoch": peer.epochs, "version": None, "val": m["final"],
                   "val_best": m["best"], "val_best_epoch": m["best_epoch"], "val_macro_f1": m["final_macro_f1"]},
        "test": score([r.label for r in split.test], preds, labels, spec),
        "params": {k: v for k, v in job.peer.items() if k not in ("workdir", "cache_dir", "result", "data")},
        "n_train": res["n_train"], "n_val": res["n_val"],
    }


def child_main(job_file: str) -> int:
    import logging

    t0 = time.time()
    job = QualityJob.load(job_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["MYCELIUM_CACHE"] = job.cache_dir
    Path(job.workdir).mkdir(parents=True, exist_ok=True)
    out = run_peer_job(job) if job.recipe == "peer" else run_ours(job)
    out.update(task=job.task, recipe=job.recipe, backbone=job.backbone, work_seconds=time.time() - t0,
               peak_rss_mib=peak_rss_mib(), cpu_seconds=own_cpu_seconds())
    Path(job.result).write_text(json.dumps(out, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: data, stack, one process per task x recipe, the report


def describe_data(folder: Path, task: str, summary: dict) -> dict:
    """Records, problems, groups and class shares per split of one task's local folder, as
    mycelium's loader and splitter see it; groups (templates / generators) from the data summary."""
    from mycelium.data.loading import load_task_data
    from mycelium.data.split import split_records
    from mycelium.tasks import get_task

    spec = get_task(train_task(task))
    data = load_task_data(str(folder), spec, progress=False)
    split = split_records(data.records, data.labels)
    groups = summary.get("tasks", {}).get(task, {}).get("splits", {})
    out = {}
    for name in ("train", "val", "test"):
        recs = split.by_name(name)
        counts = Counter(r.label for r in recs)
        out[name] = {"records": len(recs), "problems": len({r.problem_id for r in recs}),
                     "groups": groups.get(name, {}).get("groups"),
                     "shares": {lab: counts[lab] / len(recs) for lab in data.labels} if recs else {}}
    return out


def upload(folder: Path, prefix: str) -> int:
    from mycelium import storage

    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for p in files:
        storage.write_bytes(storage.join(prefix, p.relative_to(folder).as_posix()), p.read_bytes())
    return len(files)


def make_job(task: str, recipe: Recipe, data: str, backbone: str, epochs: int | None, work: Path) -> QualityJob:
    """The job of one task x recipe; a recipe argument TrainConfig does not know fails here, before anything runs."""
    from mycelium.config import config_from_args

    tt = train_task(task)
    name = f"{task}-{recipe.name}"
    run_dir = work / "runs" / name
    # Harness arguments, the same for every recipe: where the data is, the backbone, where to register.
    harness = ["--data", data, "--backbone", backbone, "--registered-model", re.sub(r"[^A-Za-z0-9]+", "-", f"quality-{name}").strip("-"), "--run-name", recipe.name]
    if epochs:
        harness += ["--epochs", str(epochs)]
    if recipe.args is not None:
        argv = list(recipe.args[tt])
    else:  # the peer: its settings come from the seed recipe's resolved config
        argv = list(RECIPES["seed"].args[tt])
    argv += harness
    cfg = config_from_args(argv, tt)  # fails here, before anything runs, on a bad recipe
    # One feature cache per task, backbone and input composition: recipes that read the same texts share it.
    inputs = ",".join(cfg.spec.input_fields)
    cache = work / "cache" / f"{task}-{backbone.replace('/', '_')}-{inputs}"
    job = QualityJob(task=task, train_task=tt, recipe=recipe.name, data=data, backbone=backbone, argv=argv,
                     workdir=str(run_dir), cache_dir=str(cache), result=str(run_dir) + ".result.json")
    if recipe.args is None:
        # The peer gets the seed recipe's settings (bench/README.md "The peer's settings").
        import torch

        job.peer = asdict(Job(
            contender="peer", config=name, task=tt, data=data, backbone=backbone, epochs=cfg.epochs,
            batch_size=cfg.batch_size, max_length=cfg.max_length, unfrozen_layers=cfg.unfrozen_layers,
            lr_head=cfg.lr_head, lr_backbone=cfg.lr_backbone, weight_decay=cfg.weight_decay,
            class_weights=cfg.class_weights, weight_clip=cfg.weight_clip, dropout=cfg.dropout, seed=cfg.seed,
            val_fraction=cfg.val_fraction, token_budget=cfg.token_budget, inputs=",".join(cfg.spec.input_fields),
            device="cuda" if torch.cuda.is_available() else "cpu",
            workdir=str(run_dir), cache_dir=str(cache), result=job.result))
        job.argv = []
    return job


def spawn(job: QualityJob, env: dict, logfile: Path) -> dict:
    """One training in a fresh process; its result (or the error and the log's tail)."""
    job_file = Path(job.workdir).with_suffix(".job.json")
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job.dump(job_file)
    t0 = time.perf_counter()
    with open(logfile, "w") as out:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)], env=env,
                              cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(job.result).is_file():
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        log(f"{job.task} {job.recipe} FAILED (exit {proc.returncode}); log {logfile}:\n    " + "\n    ".join(tail))
        return {"task": job.task, "recipe": job.recipe, "backbone": job.backbone, "error": f"exit {proc.returncode}",
                "wall_seconds": wall, "log": str(logfile)}
    res = json.loads(Path(job.result).read_text())
    res.update(wall_seconds=wall, log=str(logfile))
    return res


# ---------------------------------------------------------------------------------------------
# Report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def shares_text(shares: dict[str, float]) -> str:
    return " / ".join(f"{k} {_pct(v)}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))


def resolved(job: QualityJob) -> str:
    """The training configuration a job resolves to, without the names of where it registers."""
    from mycelium.config import config_from_args

    cfg = config_from_args(job.argv, job.train_task)
    params = {k: v for k, v in cfg.params().items() if k not in ("registered_model", "experiment", "run_name")}
    # "" and "auto" mean the table's composition and ladder: compare what runs, not how it was written.
    params.update(inputs=",".join(cfg.spec.input_fields), fallbacks=",".join(cfg.fallback_steps()))
    return json.dumps(params, sort_keys=True)


def result_row(res: dict, backbone: str) -> list[str]:
    rec = res["recipe"] + (f" (= {res['same_as']}: same configuration)" if res.get("same_as") else "")
    if "error" in res:
        return [rec, backbone, f"FAILED ({res['error']}, log {Path(res['log']).name})", "", "", "", "", "", "",
                f"{res['wall_seconds']:.0f}"]
    t = res["test"]
    sel = f"**{t['selection']:.3f}**"
    if res["flagged_collapsed"] and res["recipe"] != "peer":
        sel = f"no healthy epoch (all collapsed); last epoch: {t['selection']:.3f}"
    collapsed = ("yes (" + "; ".join(t["collapse_reasons"]) + ")" if t["collapse_reasons"] else "yes") if t["collapsed"] else "no"
    if res["recipe"] == "peer":
        champion = "— (no registry)"
        val = f"{res['winner']['val']:.3f} (final; best {res['winner']['val_best']:.3f} @ep{res['winner']['val_best_epoch']})"
    else:
        champion = f"v{res['winner']['version']}" if res.get("promoted") else f"no ({res['decision']['champion_reason']})"
        w = res.get("winner")
        val = f"{w['val']:.3f} ({w['attempt']} ep{w['epoch']})" if w else "— (no winner)"
        if w and t.get("threshold"):
            val += f", threshold {t['threshold']['value']:.3f}"
    return [rec, backbone, sel, f"{t['macro_f1']:.3f}", shares_text(t["pred_share"]), collapsed,
            "yes" if res["flagged_collapsed"] else "no", champion, val, f"{res['wall_seconds']:.0f}"]


def task_table(task: str, results: list[dict], backbone: str) -> list[str]:
    metric = METRIC_NAMES[train_task(task)]
    head = ["recipe", "backbone", f"test {metric} (selection)", "test macro F1", "test predicted classes", "collapsed on test",
            "run flagged collapsed", "champion promoted", f"val {metric} (winner)", "wall s"]
    rows = [head, ["---"] * len(head)] + [result_row(r, backbone) for r in results]
    return ["| " + " | ".join(row) + " |" for row in rows]


def data_table(sizes: dict[str, dict]) -> list[str]:
    head = ["task", "split", "records", "problems", "groups (templates / generators)", "class shares"]
    rows = [head, ["---"] * len(head)]
    for task, per_split in sizes.items():
        for name, s in per_split.items():
            rows.append([task, name, str(s["records"]), str(s["problems"]), str(s["groups"] or "?"), shares_text(s["shares"])])
    return ["| " + " | ".join(row) + " |" for row in rows]


def recipe_args_text(recipe: Recipe) -> str:
    """A recipe's arguments, tasks with the same ones named together."""
    if recipe.args is None:
        return "bench/worker.py `run_peer`, with the seed row's class weights, learning rates, unfrozen blocks, epochs, batch size and max length"
    by_args: dict[str, list[str]] = {}
    for task, argv in recipe.args.items():
        by_args.setdefault(" ".join(argv), []).append(task)
    return "; ".join(f"{', '.join(ts)}: `{a}`" if a else "none" for a, ts in by_args.items())


def render(tasks: list[str], recipes: list[str], results: dict[str, list[dict]], sizes: dict, machine: dict, backbone: str,
           epochs: int | None, data_text: str, total: float, quick: bool,
           interrupted: list[str]) -> str:
    bb = BACKBONE_NAMES.get(backbone, backbone)
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    md = [
        "# Quality bench" + (" (quick: tiny data, a smoke test — not a result)" if quick else ""),
        "",
        f"Backbone **{bb}** (`{backbone}`) for every number below. Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB{gpu}; torch {machine['torch']}, transformers {machine['transformers']}. "
        f"Epochs: {epochs or 'each recipe its own (seed: 5)'}. Total wall time {total / 60:.1f} min.",
        "",
        "Every metric is on the **test split**: problem templates that neither training nor validation "
        "saw. Ours: the winning version of the run (best healthy validation epoch over all attempts), "
        "loaded with `mycelium.load` and labelled by its own `predict` (a tuned decision threshold where "
        "the recipe has one). Peer: the Trainer's final model. *collapsed on test*: "
        "`evaluate_predictions`' flag on the test predictions; *run flagged collapsed*: every epoch of "
        "every attempt collapsed on validation (no winner).",
        "",
        "## Recipes",
        "",
        "| recipe | what | arguments (`mycelium.config.config_from_args`) |",
        "| --- | --- | --- |",
        *(f"| {name} | {RECIPES[name].title} | {recipe_args_text(RECIPES[name])} |"
          for name in recipes),
        "",
        "Every run of ours also gets `--data s3://mycelium-data/quality/<task>/ --backbone <backbone> "
        "--registered-model quality-<task>-<recipe> --run-name <recipe>`" + (f" and `--epochs {epochs}`" if epochs else "") + ".",
        "",
    ]
    md += ["## Data", "", *data_table(sizes), ""]
    if data_text:
        md += ["```", data_text, "```", ""]
    for task in tasks:
        if task not in results:
            continue
        md += [f"## {task}" + (f" (trains as {train_task(task)})" if task != train_task(task) else ""), "",
               *task_table(task, results[task], bb), ""]
    if interrupted:
        md += ["**Interrupted:** " + "; ".join(interrupted), ""]
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="", help=f"comma list of data folders (default {','.join(TASKS)}; --quick: "
                                                f"{','.join(QUICK_TASKS)})")
    p.add_argument("--recipes", default=",".join(MAIN_RECIPES),
                   help=f"comma list, run in this order (default {','.join(MAIN_RECIPES)}; also {', '.join([*ABLATION, *BY_NAME])})")
    p.add_argument("--ablation", action="store_true", help="add the ablation rows (the seed's recipe plus one feature each)")
    p.add_argument("--backbone", default="minilm", help="backbone for every recipe (default minilm, packaged and offline)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every recipe and the peer (default: each recipe's own)")
    p.add_argument("--instances", type=int, default=None, help="data: instances per template (default: data.build's; --quick: 2)")
    p.add_argument("--per-generator", type=int, default=None, help="data: problems per generator (default: data.build's; --quick: 6)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--quick", action="store_true", help="tiny data, 2 epochs, tasks c4_2.6pct,c6 unless --tasks: a smoke test; writes no results file")
    p.add_argument("--out", default="", help="markdown report (default bench/quality/results.md; --quick: none)")
    p.add_argument("--workdir", default="", help="scratch folder (default: a new temp folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (data, logs, stack, results.json)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one job file
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)

    started = time.perf_counter()
    # A SIGTERM (timeout, CI cancel) unwinds like Ctrl-C, so the stack this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # see bench/run.py: a race in MLflow's telemetry thread

    tasks = [t.strip() for t in (args.tasks or ",".join(QUICK_TASKS if args.quick else TASKS)).split(",") if t.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] + (list(ABLATION) if args.ablation else [])
    if set(recipes) - set(RECIPES):
        p.error(f"--recipes: choose from {', '.join(RECIPES)}; got {args.recipes!r}")
    if any(train_task(t) not in SEED_TABLE for t in tasks):
        p.error(f"--tasks: data folders of c4, c5 or c6 (e.g. {','.join(TASKS)}); got {args.tasks!r}")
    epochs = args.epochs or (2 if args.quick else None)
    size = {k: v for k, v in (("instances", args.instances or (2 if args.quick else None)),
                              ("per_generator", args.per_generator or (6 if args.quick else None))) if v}

    machine = machine_description()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu'] or 'none'}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mycelium-quality-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log(f"scratch folder {work}")

    from bench.quality import data as data_mod

    t = time.perf_counter()
    data_summary = data_mod.build(work / "data", seed=args.seed, **size)
    missing = [task for task in tasks if not (work / "data" / task).is_dir()]
    if missing:
        p.error(f"data.build wrote no folder for {missing}; it wrote {sorted(x.name for x in (work / 'data').iterdir() if x.is_dir())}")
    sizes = {task: describe_data(work / "data" / task, task, data_summary) for task in tasks}
    log(f"data built in {time.perf_counter() - t:.0f} s: " + "; ".join(
        f"{task} " + "/".join(str(s['records']) for s in sizes[task].values()) + " train/val/test" for task in tasks))

    from mycelium import stack as stack_mod

    stack_cfg = stack_mod.StackConfig(state_dir=work / "stack", ports=stack_mod.free_ports())
    log(f"starting the embedded stack (MLflow {stack_cfg.tracking_uri}, S3 {stack_cfg.s3_endpoint})")
    stack_mod.up(stack_cfg, log=lambda *a: None)
    os.environ.update(stack_mod.stack_env(stack_cfg))
    child_env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    child_env.pop("MLFLOW_RUN_ID", None)

    results: dict[str, list[dict]] = {}
    interrupted: list[str] = []
    try:
        for task in tasks:
            prefix = f"s3://mycelium-data/quality/{task}/"
            log(f"== {task}: uploaded {upload(work / 'data' / task, prefix)} file(s) to {prefix}")
            results[task] = []
            trained: dict[str, dict] = {}  # resolved training config -> its result, within this task
            for name in recipes:
                job = make_job(task, RECIPES[name], prefix, args.backbone, epochs, work)
                same = trained.get(resolved(job))
                if same is not None:  # e.g. `default` where the defaults are the seed's: not trained twice
                    log(f"   {task} {name}: the same configuration as {same['recipe']}, not trained again")
                    results[task].append({**same, "recipe": name, "same_as": same["recipe"]})
                    continue
                log(f"   {task} {name} ...")
                t_run = time.perf_counter()
                try:
                    res = spawn(job, child_env, work / "logs" / f"{task}-{name}.log")
                except (KeyboardInterrupt, SystemExit):
                    interrupted.append(f"{task} {name} had run {time.perf_counter() - t_run:.0f} s without finishing")
                    raise
                results[task].append(res)
                if job.argv and "error" not in res:
                    trained[resolved(job)] = res
                if "error" not in res:
                    t_ = res["test"]
                    log(f"   {name}: test {METRIC_NAMES[train_task(task)]} {t_['selection']:.3f}, macro F1 "
                        f"{t_['macro_f1']:.3f}, predicted {shares_text(t_['pred_share'])}"
                        f"{', COLLAPSED on test' if t_['collapsed'] else ''}"
                        f"{', run flagged collapsed' if res['flagged_collapsed'] else ''}; {res['wall_seconds']:.0f} s")
    except (KeyboardInterrupt, SystemExit):
        # A time limit (SIGTERM) or Ctrl-C: report what finished instead of losing it.
        if not interrupted:
            interrupted.append(f"stopped {time.perf_counter() - started:.0f} s in, between runs")
        log("interrupted: " + "; ".join(interrupted) + "; reporting what finished")
    finally:
        log("stopping the embedded stack")
        stack_mod.down(stack_cfg, log=lambda *a: None)

    total = time.perf_counter() - started
    # The generator's own account (what it drew and skipped); the per-split tables are ours above.
    data_text = data_mod.format_summary(data_summary).split("\n\n")[0] if hasattr(data_mod, "format_summary") else ""
    md = render(tasks, recipes, results, sizes, machine, args.backbone, epochs, data_text, total, args.quick, interrupted)
    print()
    print(md)
    out = args.out or ("" if args.quick else str(HERE / "results.md"))
    if out:
        Path(out).write_text(md)
        log(f"wrote {out}")
    (work / "results.json").write_text(json.dumps(
        {"machine": machine, "backbone": args.backbone, "epochs": epochs, "data": sizes, "data_summary": data_summary,
         "results": results, "total_seconds": total, "interrupted": interrupted},
        indent=1, default=str))
    log(f"raw results in {work / 'results.json'}" + ("" if args.keep or args.workdir else " (removed: pass --keep)"))
    log(f"total wall time {total:.0f} s ({total / 60:.1f} min)")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for rs in results.values() for r in rs if "error" in r]
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
