"""The launcher behind `mlflow run . -e cX` and `mycelium train`: parse, train, summarise.

Errors a user can fix (bad parameters, bad data, an unreachable server, a backbone that cannot
load) end the process with exit code 2 and one clear message, never a stack trace.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.table import Table

from mycelium.config import ConfigError, config_from_args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "mlflow.utils", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(result, cfg, console: Console) -> None:
    metric = cfg.spec.selection_metric
    attempts = Table(title=f"{cfg.task}: attempts (best epoch of each)")
    for col in ("attempt", "best epoch", metric, "macro F1", "collapsed", "version"):
        attempts.add_column(col)
    for r in result.attempts:
        best = r.best(metric)
        shown = best or max(r.epochs, key=lambda e: e.report.metrics[metric])
        attempts.add_row(f"{r.attempt.index}-{r.attempt.name}", str(shown.epoch), f"{shown.report.metrics[metric]:.4f}",
                         f"{shown.report.metrics['macro_f1']:.4f}", "yes" if best is None else "no", str(shown.version))
    console.print(attempts)
    if result.winner:
        _, e = result.winner
        per_class = Table(title=f"{cfg.task}: best epoch per-class F1 (version {e.version})")
        for col in ("class", "precision", "recall", "F1", "support", "predicted share"):
            per_class.add_column(col)
        from mycelium.metrics import metric_key

        m = e.report.metrics
        for label in result.labels:
            per_class.add_row(label, *(f"{m[metric_key(p, label)]:.3f}" for p in ("precision", "recall", "f1")),
                              str(int(m[metric_key("support", label)])), f"{m[metric_key('pred_share', label)]:.3f}")
        console.print(per_class)
    collapsed = [f"v{e.version} ({r.attempt.name} epoch {e.epoch}: {'; '.join(e.report.collapse_reasons)})"
                 for r in result.attempts for e in r.epochs if e.report.collapsed]
    if collapsed:
        console.print(f"flagged collapsed, never promoted: {', '.join(collapsed)}")
    d = result.decision
    console.print(f"champion: {'PROMOTED' if d.promoted else 'kept'} — {d.reason}")
    console.print(f"registered model: {cfg.registered_model}   run: {result.ui}")


def main(task: str | None, argv: list[str] | None = None) -> int:
    setup_logging()
    console = Console(stderr=False)
    try:
        cfg = config_from_args(argv, task)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)  # one line: a command in it stays whole
        return 2
    from mycelium.data.loading import DataError
    from mycelium.model.backbone import BackboneLoadError
    from mycelium.stack import StackError, require_tracking, use_running_stack
    from mycelium.storage import StorageError
    from mycelium.tracking.runs import TrackingError
    from mycelium.train.run import run

    try:
        use_running_stack(log=logging.getLogger("mycelium").info)
        require_tracking()
        result = run(cfg)
    except (ConfigError, DataError, BackboneLoadError, TrackingError, StackError, StorageError, FloatingPointError) as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)  # one line: a command in it stays whole
        return 2
    print_summary(result, cfg, console)
    return 0


if __name__ == "__main__":
    sys.exit(main(None, sys.argv[1:]))
