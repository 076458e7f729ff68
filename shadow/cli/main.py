"""The `shadow` command line: one subcommand a module, each with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from vllm_shadow.adapters.traces import TraceError

# The third-party packages the engine-side hook does not need, by the extra of the `vllm-shadow` distribution that
# installs them: `pip install vllm-shadow` alone is the hook (grpcio and protobuf), for vLLM's environment.
EXTRA_OF_PACKAGE = {
    "numpy": "shadow",
    "rich": "shadow",
    "ortools": "shadow",
    "matplotlib": "shadow",
    "prometheus_client": "shadow",
    "opentelemetry": "shadow",
    "ray": "ray",
}

# Subcommands, in the order `--help` lists them.
COMMANDS = (
    "vllm_shadow.cli.demo",
    "vllm_shadow.cli.replay",
    "vllm_shadow.cli.optimal",
    "vllm_shadow.cli.fidelity",
    "vllm_shadow.cli.profile",
    "vllm_shadow.cli.serve",
    "vllm_shadow.cli.status",
    "vllm_shadow.cli.report",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command `only` alone: a command's imports are its own (OR-Tools,
    Ray, pandas, ...), and `shadow status` should not pay for the others'."""
    parser = argparse.ArgumentParser(
        prog="shadow",
        description="Shadow scheduler for vLLM: replays real traffic under alternative schedulers and an "
        "optimal one, and reports how far each is from the others.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name.rsplit(".", 1)[-1] != only:
            continue
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            hint = missing_extra_hint(exc)
            if hint is None:
                raise
            _add_unavailable(subparsers, name.rsplit(".", 1)[-1], hint)
            continue
        module.add_parser(subparsers)
    return parser


def missing_extra_hint(exc: ModuleNotFoundError) -> str | None:
    """What to install when `exc` is a package of one of our extras; None when it is not."""
    package = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    if extra is None:
        return None
    return f"{package} is missing: it comes with the {extra!r} extra: pip install 'vllm-shadow[{extra}]'"


def _add_unavailable(subparsers: argparse._SubParsersAction, command: str, hint: str) -> None:
    # Listed all the same, so that `shadow COMMAND` says what to install instead of "invalid choice".
    # Its options are unknown: `main` lets them through (--help included) to this message.
    parser = subparsers.add_parser(command, help=f"(not installed: {hint})", add_help=False)
    parser.set_defaults(func=lambda _args: _fail(f"shadow {command} cannot run: {hint}"), unavailable=True)


def _fail(message: str) -> int:
    print(f"shadow: error: {message}", file=sys.stderr)
    return 2


def _command_named(argv: list[str]) -> str | None:
    commands = {name.rsplit(".", 1)[-1] for name in COMMANDS}
    return argv[0] if argv and argv[0] in commands else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(only=_command_named(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # a package a command imports only when it runs (Ray, say)
        hint = missing_extra_hint(exc)
        if hint is None:
            raise
        return _fail(hint)
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
