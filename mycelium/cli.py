"""The `mycelium` command: stack, data and training subcommands."""

from __future__ import annotations

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mycelium", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stack(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mycelium.stack import StackError

    try:
        return int(args.func(args) or 0)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
