"""The `mycelium` command: stack, data and training subcommands."""

from __future__ import annotations

import argparse
import sys

from mycelium.tasks import CHAMPION


def _stack_config(args: argparse.Namespace):
    from mycelium import stack

    ports = {name: getattr(args, f"{name}_port", None) for name in stack.DEFAULT_PORTS}
    return stack.load_config(args.state_dir, ports)


def cmd_stack(args: argparse.Namespace) -> int:
    from mycelium import stack

    cfg = _stack_config(args)
    if args.action == "up":
        stack.up(cfg)
    elif args.action == "down":
        stack.down(cfg)
    elif args.action == "env":
        sys.stdout.write(stack.env_exports(cfg))
    elif args.action == "status":
        st = stack.status(cfg)
        for service, s in st.items():
            state = "healthy" if s["healthy"] else ("running, not answering" if s["running"] else "stopped")
            print(f"{service:10s} {state:24s} {s['url']}" + (f"  pid {s['pid']}" if s["pid"] else ""))
        print(f"state      {cfg.state_dir}")
        return 0 if all(s["healthy"] for s in st.values()) else 1
    return 0


def _add_stack(sub) -> None:
    from mycelium.stack import DEFAULT_PORTS

    p = sub.add_parser("stack", help="the embedded S3 (SeaweedFS) + MLflow server on loopback")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--state-dir", default=None, help="state folder (default .mycelium/stack, or $MYCELIUM_STACK_DIR)")
    for name, default in DEFAULT_PORTS.items():
        p.add_argument(f"--{name}-port", type=int, default=None, help=f"{name} port (default {default}, or $MYCELIUM_{name.upper()}_PORT)")
    p.set_defaults(func=cmd_stack)


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "demo":
        from mycelium.data.demo import write_demo_corpus

        stats = write_demo_corpus(args.dest, files=args.files, per_file=args.per_file, seed=args.seed)
        for task, st in stats.items():
            counts = st["labels"]
            total = sum(counts.values())
            mix = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            print(f"{task}: {st['files']} files, {total} records -> {args.dest.rstrip('/')}/{task}/  ({mix})")
        return 0
    if args.action == "stats":
        from mycelium.data.stats import print_stats, stats_report
        from mycelium.tasks import get_task

        report = stats_report(args.prefix, get_task(args.task), field_map=args.field_map or None, label_names=args.label_names or None)
        print_stats(report)
        return 0
    if args.action == "gsm8k":
        from mycelium.data.gsm8k import convert_gsm8k

        counts = convert_gsm8k(args.file, args.dest, per_file=args.per_file)
        print(counts)
        return 0
    return 1


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="demo corpus, GSM8K conversion, dataset statistics")
    dsub = p.add_subparsers(dest="action", required=True)
    demo = dsub.add_parser("demo", help="write a seed-shaped demo corpus for c4, c5 and c6")
    demo.add_argument("--dest", default="s3://mycelium-data", help="destination prefix (S3 URI or local folder)")
    demo.add_argument("--files", type=int, default=117, help="files per task (seed: 117)")
    demo.add_argument("--per-file", type=int, default=583, help="records per file (seed: ~583)")
    demo.add_argument("--seed", type=int, default=0)
    stats = dsub.add_parser("stats", help="files, records, class distribution and bad records under a prefix")
    stats.add_argument("prefix")
    stats.add_argument("--task", required=True, choices=["c4", "c5", "c6"])
    stats.add_argument("--field-map", default="")
    stats.add_argument("--label-names", default="")
    g = dsub.add_parser("gsm8k", help="turn GSM8K-format solutions into c4 and c5 record files")
    g.add_argument("file", help="JSONL with question and answer per record")
    g.add_argument("--dest", required=True, help="destination prefix; writes DEST/c4/ and DEST/c5/")
    g.add_argument("--per-file", type=int, default=583)
    p.set_defaults(func=cmd_data)


def cmd_predict(args: argparse.Namespace) -> int:
    from mycelium.serving.predict import run_predict

    return run_predict(args)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="labels and class probabilities for a JSONL file or stdin, from a registered model",
        description="Predict with a registered model. Input: JSONL records with the task's input fields "
        "(c4/c5: step_i, step_j; c6: problem; an 'id' is copied to the output), or plain text lines for c6. "
        "Output: JSONL {\"id\", \"label\", \"probabilities\"} in input order.",
    )
    p.add_argument("--task", required=True, choices=["c4", "c5", "c6"])
    p.add_argument("--model", default=CHAMPION,
                   help="alias (default champion), version number, or model URI (models:/..., runs:/<run_id>/<name>, folder)")
    p.add_argument("--registered-model", default=None, help="registered model name (default mycelium-<task>)")
    p.add_argument("--input", required=True, help="JSONL file (.jsonl or .jsonl.gz), or - for stdin")
    p.add_argument("--output", default=None, help="JSONL file to write (default stdout)")
    p.add_argument("--batch-size", type=int, default=64, help="records per forward pass (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU when there is one)")
    p.add_argument("--backbone", default=None,
                   help="load the backbone from this folder / hub id instead of the recorded one (or $MYCELIUM_BACKBONE)")
    p.add_argument("--quiet", action="store_true", help="no model line and no progress bar on stderr")
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mycelium", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stack(sub)
    _add_data(sub)
    _add_predict(sub)
    t = sub.add_parser("train", help="train one task (same parameters as `mlflow run . -e cX -P ...`)", add_help=False)
    t.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from mycelium.entry import main as train_main

        return train_main(None, argv[1:])
    args = build_parser().parse_args(argv)
    from mycelium.data.loading import DataError
    from mycelium.stack import StackError, require_tracking, use_running_stack
    from mycelium.storage import StorageError

    try:
        if args.command != "stack":
            use_running_stack(log=lambda line: print(line, file=sys.stderr))
        if args.command == "predict":
            require_tracking()
        return int(args.func(args) or 0)
    except (StackError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
