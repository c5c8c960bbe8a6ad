"""The launcher behind `mlflow run . -e cX` and `mycelium train`: parse, train, summarise.

Errors a user can fix (bad parameters, bad data, an unreachable server, a backbone that cannot
load) end the process with exit code 2 and one clear message, never a stack trace.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mycelium.config import ConfigError, config_from_args
from mycelium.distributed import World, launched_world, nproc, relaunch


FOLLOWER_GRACE_SECONDS = 10  # torchrun polls its ranks every 0.1 s; rank 0's exit takes well under this


def setup_logging(rank: int = 0) -> None:
    # Ranks other than 0 of a data-parallel training print only errors (rank 0 reports), no progress bars.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, datefmt="%H:%M:%S",
                        format=f"%(asctime)s %(levelname)s {f'rank {rank} ' if rank else ''}%(name)s: %(message)s")
    if rank:
        os.environ["TQDM_DISABLE"] = "1"
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


def say(console: Console, label: str, message: object) -> None:
    """One red-labelled line; soft-wrapped so a command in it stays whole, escaped so brackets in it print as written."""
    console.print(f"[red]{label}:[/red] {escape(str(message))}", soft_wrap=True)


def main(task: str | None, argv: list[str] | None = None) -> int:
    world = launched_world()  # set when torchrun (or a cluster launcher) started this process
    setup_logging(world.rank if world else 0)
    console = Console(stderr=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(argv, task)
        n = nproc(cfg.nproc_per_node, cfg.device)
    except (ConfigError, ValueError) as e:
        say(console, "error", e)
        return 2
    if world is None and n > 1:
        return relaunch(n, "mycelium.entry", [*(["--task", task] if task else []), *argv])
    if world is not None and not world.main:
        return _follow(cfg, world, console)
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
        say(console, "error", e)
        return 2
    print_summary(result, cfg, console)
    return 0


def _follow(cfg, world: World, console: Console) -> int:
    """A rank other than 0: no stack, tracking or data of its own (rank 0 has them), no summary."""
    from mycelium.model.backbone import BackboneLoadError
    from mycelium.train.run import run

    try:
        run(cfg)
    except (BackboneLoadError, FloatingPointError) as e:
        say(console, f"error (rank {world.rank})", e)
        return 2
    except RuntimeError as e:  # a collective failed: rank 0 stopped (it said why), a peer died, or a timeout
        say(console, f"stopped (rank {world.rank})", (str(e) or type(e).__name__).splitlines()[0])
        # The rank that failed first gives the launcher its exit status: wait for the launcher to end
        # this one once it sees that rank's, rather than exit first and have ours reported.
        time.sleep(FOLLOWER_GRACE_SECONDS)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(None, sys.argv[1:]))
