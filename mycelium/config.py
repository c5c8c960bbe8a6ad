"""Training configuration: one dataclass, filled from a task spec and overridden by parameters.

The MLproject entry points, ``mycelium train`` and tests all build a ``TrainConfig`` through
``config_from_args``; every field can be set with ``-P name=value`` (MLproject) or ``--name value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mycelium.model.pooling import DEFAULT_POOLING, POOLINGS
from mycelium.tasks import TaskSpec, get_task
from mycelium.text import NUMBER_MODES
from mycelium.train.losses import LOSSES, WEIGHT_SCHEMES

DEFAULT_BACKBONE = "Qwen/Qwen2.5-0.5B-Instruct"

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FALLBACK_STEPS = ("unfreeze", "sqrt_inv", "focal")
INPUT_FIELDS = ("problem", "earlier_steps", "step_i", "step_j")  # the record fields a model can read (data contract)
LR_SCHEDULES = ("constant", "linear", "cosine")


def state_root() -> Path:
    """Local working state (resume states, checkpoints awaiting upload): $MYCELIUM_STATE, else .mycelium."""
    return Path(os.environ.get("MYCELIUM_STATE", ".mycelium"))


class ConfigError(ValueError):
    """A parameter is out of range; the message names the parameter and what to do."""


@dataclass
class TrainConfig:
    task: str
    data: str = ""  # default: the task's S3 prefix
    backbone: str = DEFAULT_BACKBONE
    revision: str = ""
    epochs: int = 5
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 2e-5
    weight_decay: float = 0.01
    unfrozen_layers: int = 0
    class_weights: str = "balanced"
    weight_clip: float = 5.0
    explicit_weights: str = ""  # "1.0,19.2" in label order, with class_weights=explicit
    cb_beta: float = 0.999  # class_weights=effective: beta of the effective number (1 - beta^n) / (1 - beta)
    loss: str = "ce"
    focal_gamma: float = 2.0
    la_tau: float = 1.0  # loss=logit_adjusted: logits + tau * log(prior) during training
    # Record fields the model reads, comma-separated, in order (e.g. problem,step_i,step_j);
    # "" = the task's default. Truncation cuts context fields (problem) first, steps stay whole.
    inputs: str = ""
    # keep: numbers as written; symbols: each number value of a record becomes N1, N2, ... (the same
    # symbol in every field), so the model sees which step reuses which quantity. Default: the task table's.
    numbers: str = "keep"
    pooling: str = DEFAULT_POOLING  # mean: masked mean over real tokens; last: the last real token
    # Binary tasks: "auto" tunes the decision threshold on validation for the selection metric
    # (stored in the checkpoint, applied by every consumer); "none" = argmax; or a probability.
    # Default: the task table's (argmax: a tuned threshold lost on unseen templates, bench/quality).
    threshold: str = "none"
    lr_schedule: str = "constant"  # constant | linear | cosine (transformers' schedulers, per step)
    warmup_ratio: float = 0.0  # share of an attempt's steps with a linear warmup
    early_stopping: int = 0  # stop an attempt after this many epochs without a better selection metric; 0 = off
    min_metric: float = 0.0  # a version below this selection metric never takes the champion alias; 0 = off
    # grid: before a frozen first attempt, train heads for a grid of class weights x loss x head lr on
    # the cached features and register the best on validation (mycelium.search); none: the recipe as given.
    search: str = "none"
    precision: str = "auto"
    max_length: int = 128
    seed: int = 0
    val_fraction: float = 0.2
    registered_model: str = ""
    experiment: str = ""  # default: the registered model name
    field_map: str = ""  # "problem=text,label=target"
    label_names: str = ""  # "INTEGER,FRACTION,..." for integer labels
    on_error: str = "fail"  # fail | skip
    fallback_threshold: float = 0.80
    fallbacks: str = "auto"  # auto (the task's ladder) | none | comma list of unfreeze,sqrt_inv,focal
    force_fallbacks: bool = False  # run the whole ladder even when the first attempt is good
    collapse_dominance: float = 0.9
    dropout: float = 0.1
    # Padded tokens per batch (rows are further capped by batch_size); 0 = auto: 8192 on a GPU; on a
    # CPU 4096 for training batches (batch_size 32 x max_length 128 fits whole) and 2048 for the
    # no-grad backbone passes, the fastest size there (MiniLM pooled pass 11.6 s vs 12.7 s at 4096, 2 cores).
    token_budget: int = 0
    cache: bool = True  # feature / prefix cache for frozen computation
    # Largest prefix cache in GiB (over it: the full forward every epoch); 0 = auto: half the RAM
    # available when the run starts. Seed-sized C6 on Qwen2.5-0.5B needs about 11 GiB in bf16.
    cache_memory_gb: float = 0.0
    resume: bool = False
    # Seconds an upload to MLflow / the artifact store is retried (doubling waits) before the
    # training stops with the component that is down and the command that resumes.
    retry_seconds: float = 60.0
    bundle_backbone: bool = False  # copy the backbone into every registered version (air-gapped serving)
    run_name: str = ""
    device: str = "auto"
    # Processes on this machine (data parallelism under torchrun): 1 = one plain process; N; or auto =
    # one per visible GPU. Started by torchrun or another launcher (RANK/WORLD_SIZE set), the training
    # joins the world it was given instead.
    nproc_per_node: str = "1"
    # Seconds a rank waits in a collective (a rank died, a node is gone) before every rank stops.
    dist_timeout: float = 1800.0
    spec: TaskSpec | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.spec or get_task(self.task)
        if self.inputs:
            # The chosen composition becomes the spec's: loading, fingerprint and manifest follow it.
            fields = tuple(f.strip() for f in self.inputs.split(",") if f.strip())
            self.spec = dataclasses.replace(self.spec, input_fields=fields,
                                            allow_empty=tuple(f for f in fields if f in self.spec.allow_empty or f in self.spec.context_fields))
        self.data = self.data or self.spec.data_prefix
        self.registered_model = self.registered_model or self.spec.registered_model
        self.experiment = self.experiment or self.registered_model

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"parameter {name}={getattr(self, name)!r}: {why} (set it with -P {name}=... or --{name.replace('_', '-')})")

        if self.epochs < 1 or self.epochs > 1000:
            raise bad("epochs", "must be between 1 and 1000")
        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        for name in ("lr_head", "lr_backbone"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, "must be in (0, 1)")
        if self.unfrozen_layers < 0:
            raise bad("unfrozen_layers", "must be >= 0 (0 = frozen backbone)")
        if self.class_weights not in WEIGHT_SCHEMES:
            raise bad("class_weights", f"choose one of {', '.join(WEIGHT_SCHEMES)}")
        if self.class_weights == "explicit" and not self.explicit_weights:
            raise bad("explicit_weights", "class_weights=explicit needs weights in label order, e.g. 1.0,19.2")
        if self.class_weights == "clipped" and self.weight_clip < 1:
            raise bad("weight_clip", "must be >= 1 (a multiple of the smallest class weight)")
        if self.loss not in LOSSES:
            raise bad("loss", f"choose one of {', '.join(LOSSES)}")
        if not 0 < self.cb_beta < 1:
            raise bad("cb_beta", "must be in (0, 1), e.g. 0.999")
        if self.la_tau < 0:
            raise bad("la_tau", "must be >= 0 (1 = Menon et al.'s logit adjustment)")
        fields = self.spec.input_fields
        unknown = [f for f in fields if f not in INPUT_FIELDS]
        if not fields or unknown or len(set(fields)) != len(fields):
            raise bad("inputs", f"give distinct record fields from {', '.join(INPUT_FIELDS)}, comma-separated "
                                f"(the seed's: {','.join(self.spec.seed_inputs)})")
        if self.numbers not in NUMBER_MODES:
            raise bad("numbers", f"choose one of {', '.join(NUMBER_MODES)}")
        if self.pooling not in POOLINGS:
            raise bad("pooling", f"choose one of {', '.join(POOLINGS)}")
        if self.threshold not in ("auto", "none"):
            try:
                value = float(self.threshold)
            except ValueError:
                value = -1.0
            if not 0 < value < 1:
                raise bad("threshold", "use auto (tuned on validation), none (argmax) or a probability in (0, 1)")
        if self.threshold not in ("auto", "none") and self.spec.minority_label is None:
            raise bad("threshold", f"a fixed threshold needs a binary task; {self.task} has no minority label (use auto or none)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"choose one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.early_stopping < 0:
            raise bad("early_stopping", "must be >= 0 (epochs without improvement; 0 = off)")
        if self.search not in ("none", "grid"):
            raise bad("search", "choose none or grid")
        if not 0 <= self.min_metric <= 1:
            raise bad("min_metric", "must be in [0, 1] (0 = no minimum)")
        if self.focal_gamma < 0:
            raise bad("focal_gamma", "must be >= 0")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {', '.join(PRECISIONS)}")
        if not 8 <= self.max_length <= 32768:
            raise bad("max_length", "must be between 8 and 32768 tokens")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "must be in (0, 1)")
        if self.on_error not in ("fail", "skip"):
            raise bad("on_error", "choose fail or skip")
        if not 0 <= self.fallback_threshold <= 1:
            raise bad("fallback_threshold", "must be in [0, 1]")
        if not 0 < self.collapse_dominance <= 1:
            raise bad("collapse_dominance", "must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if self.retry_seconds < 0:
            raise bad("retry_seconds", "must be >= 0 (seconds an upload is retried; 0 = one try)")
        if self.cache_memory_gb < 0:
            raise bad("cache_memory_gb", "must be 0 (auto: half the available RAM) or a size in GiB")
        if self.token_budget < 0:
            raise bad("token_budget", "must be 0 (auto) or a number of tokens")
        if self.token_budget and self.token_budget < self.max_length:
            raise bad("token_budget", f"must be at least max_length ({self.max_length})")
        for step in self.fallback_steps():
            if step not in FALLBACK_STEPS:
                raise bad("fallbacks", f"unknown step {step!r}: use auto, none, or a list of {', '.join(FALLBACK_STEPS)}")
        if self.nproc_per_node != "auto" and not (self.nproc_per_node.isdigit() and int(self.nproc_per_node) >= 1):
            raise bad("nproc_per_node", "give a number of processes (1 = no data parallelism) or auto (one per visible GPU)")
        if self.dist_timeout <= 0:
            raise bad("dist_timeout", "must be a positive number of seconds")
        if not self.backbone:
            raise bad("backbone", "give a hub id, a local path, or minilm (the packaged offline encoder)")

    def fallback_steps(self) -> tuple[str, ...]:
        if self.fallbacks == "auto":
            return self.spec.fallbacks
        if self.fallbacks in ("", "none"):
            return ()
        return tuple(s.strip() for s in self.fallbacks.split(",") if s.strip())

    def resume_command(self, mlflow_run: bool) -> str:
        """The command that resumes this training: its non-default parameters and resume=true, as
        ``mlflow run`` (when it launched this one) or ``mycelium train`` takes them."""
        defaults = config_from_args([], self.task).params()
        changed = {k: v for k, v in self.params().items() if v != defaults[k] and k != "resume"}
        changed["resume"] = "true"
        if mlflow_run:
            args = " ".join(f"-P {k}={shlex.quote(v)}" for k, v in changed.items())
            # The environment manager `mlflow run` used shows in this interpreter's location.
            manager = "conda" if "mlflow-" in os.environ.get("CONDA_PREFIX", "") else "virtualenv" if "/.mlflow/envs/" in sys.prefix else "local"
            return f"mlflow run . -e {self.task} --env-manager {manager} --experiment-name {self.experiment} {args}"
        args = " ".join(f"--{k.replace('_', '-')} {shlex.quote(v)}" for k, v in changed.items())
        return f"mycelium train --task {self.task} {args}"

    def params(self) -> dict[str, str]:
        """The configuration as MLflow params (no secrets live here: credentials come from env)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "spec"}


def _bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _int(value: str) -> int:
    # MLproject has no integer type: "5.0" arrives for a float parameter.
    f = float(value)
    if f != int(f):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(f)


def task_defaults(spec: TaskSpec) -> dict:
    """The seed's recipe for a task, as TrainConfig field values."""
    return {
        "unfrozen_layers": spec.unfrozen_layers,
        "class_weights": spec.class_weights,
        "weight_clip": spec.weight_clip,
        "loss": spec.loss,
        "focal_gamma": spec.focal_gamma,
        "lr_head": spec.lr_head,
        "lr_backbone": spec.lr_backbone,
        "epochs": spec.epochs,
        "threshold": spec.threshold,
        "numbers": spec.numbers,
    }


def build_arg_parser(task: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"mycelium train{' --task ' + task if task else ''}",
        description="Train a Mycelium classifier, tracked in MLflow.",
    )
    if task is None:
        p.add_argument("--task", required=True, choices=["c4", "c5", "c6"])
    types = {int: _int, float: float, str: str, bool: _bool}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "spec"):
            continue
        ftype = {"int": int, "float": float, "str": str, "bool": bool}[f.type] if isinstance(f.type, str) else f.type
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=types[ftype], default=None)
    return p


def config_from_args(argv: list[str] | None, task: str | None = None) -> TrainConfig:
    args = build_arg_parser(task).parse_args(argv)
    task = task or args.task
    spec = get_task(task)
    values = task_defaults(spec)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "task"})
    cfg = TrainConfig(task=task, spec=spec, **values)
    cfg.validate()
    return cfg
