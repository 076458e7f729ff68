"""The `shadow` command line: one subcommand a module, each with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from vllm_shadow.adapters.traces import TraceError

# Subcommands, in the order `--help` lists them.
COMMANDS = (
    "vllm_shadow.cli.demo",
    "vllm_shadow.cli.replay",
    "vllm_shadow.cli.optimal",
    "vllm_shadow.cli.profile",
    "vllm_shadow.cli.serve",
    "vllm_shadow.cli.status",
    "vllm_shadow.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadow",
        description="Shadow scheduler for vLLM: replays real traffic under alternative schedulers and an "
        "optimal one, and reports how far each is from the others.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing optional dependency of that command
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (TraceError, ValueError, FileNotFoundError) as exc:
        print(f"shadow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
