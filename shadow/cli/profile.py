"""`shadow profile`: measure a model's step times on this machine and write the cost profile fitted to them.

torch is an optional dependency (the `profile` extra): this module imports it only when the command runs, so
that `shadow` works without it and says how to get it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.roofline import roofline_prior

if TYPE_CHECKING:
    from vllm_shadow.costmodel.profiling import ProfileRun

INSTALL_HINT = (
    "shadow profile needs torch, an optional dependency: pip install 'vllm-shadow[shadow,profile]' "
    "(or install a torch build for your device, e.g. the CPU one: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure a model's step times on this machine and fit a cost profile",
        description="Build a random-weight model from a Hugging Face config (a few of its decoder layers, with "
        "the embedding and LM head), time its forward pass over a grid of prefill, decode and mixed batches, "
        "fit INFERMAX's linear cost model and write it as a profile for `shadow replay --cost-profile`. "
        "Prints the fit's error and the roofline prior's on each kind of batch.",
    )
    parser.add_argument("--model", required=True, help="a bundled model name or a path to a config.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--layers",
        type=int,
        help="decoder layers to build and time (default: 4, or the model's count if smaller); times are "
        "scaled to the model's layer count",
    )
    parser.add_argument("--out", required=True, help="the profile file to write (JSON)")
    parser.add_argument(
        "--hardware",
        help="hardware-table entry to name the profile after and whose roofline prior to compare with "
        "(a100, h100, h200, l40s, a10g, cpu; default: matched from the device)",
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch threads (default 1, timed by the thread's CPU time, which a shared machine's "
        "load does not disturb; more threads are timed by the wall clock and need an idle machine)",
    )
    grid = parser.add_argument_group("batch grid")
    grid.add_argument(
        "--max-batched-tokens", type=int, default=2048, help="new tokens per step (default 2048)"
    )
    grid.add_argument("--max-context", type=int, default=4096, help="tokens per request (default 4096)")
    grid.add_argument("--max-decodes", type=int, default=256, help="decode requests per step (default 256)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the grid's jitter and the weights")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=2, help="untimed runs of each batch first (default 2)")
    timing.add_argument("--repeats", type=int, default=5, help="timed runs of each batch (default 5)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from vllm_shadow.costmodel import profiling
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(f"shadow: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    arch = load_model(args.model)
    profiling.check_supported(arch)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist")
    hardware_name = args.hardware or profiling.device_hardware_name(args.device)
    hardware = get_hardware(hardware_name) if hardware_name else None
    stderr = Console(stderr=True)
    prior = None
    if hardware:
        try:
            prior = roofline_prior(arch, hardware)
        except ValueError as exc:  # e.g. the whole model does not fit the device, though its few layers do
            stderr.print(f"[yellow]no roofline prior to compare with:[/] {exc}")
    settings = profiling.ProfileSettings(
        device=args.device,
        dtype=args.dtype,
        layers=args.layers,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        max_batched_tokens=args.max_batched_tokens,
        max_context=args.max_context,
        max_decodes=args.max_decodes,
        seed=args.seed,
    )
    with Progress(
        TextColumn(f"[bold]profiling[/] {arch.name} on {args.device}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not stderr.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)
        result = profiling.run_profile(
            arch,
            settings,
            hardware=hardware,
            prior=prior,
            command=_command(args, settings.layers_for(arch)),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    profiling.save_profile_run(result, out)
    console = Console()
    if not console.is_terminal:
        console.width = 150  # a piped report keeps its table's columns rather than wrapping them to 80
    print_report(result, out, console)
    return 0


def print_report(result: ProfileRun, path: Path, console: Console) -> None:
    profile = result.profile
    console.print(f"[bold]{profile.model}[/] on {profile.hardware}: {profile.provenance}")
    prior_name = f"roofline prior ({result.prior_hardware})" if result.prior else "roofline prior"
    table = Table(header_style="bold")
    for column in (
        "batch kind",
        "batches",
        "linear fit MAPE",
        "linear hold-out MAPE",
        "without e·R, hold-out",
        f"{prior_name} MAPE",
        "prior bias",
    ):
        table.add_column(column, justify="left" if column == "batch kind" else "right", no_wrap=True)
    for row in result.errors:
        table.add_row(
            row.kind,
            str(row.samples),
            _percent(row.fit_mape),
            _percent(row.holdout_mape),
            _percent(row.without_request_term_holdout_mape),
            _percent(row.prior_mape),
            _percent(row.prior_bias, signed=True),
        )
    console.print(table)
    cost = profile.cost
    console.print(
        f"fitted: {cost.a * 1e3:.4g} ms per step + {cost.b * 1e6:.4g} us per new token + "
        f"{cost.c * 1e9:.4g} ns per KV token attended + {cost.d * 1e9:.4g} ns per prefill query-key pair + "
        f"{cost.e * 1e6:.4g} us per request"
    )
    console.print(
        "[dim]MAPE: mean absolute percentage error of step times; hold-out: 5-fold, each batch predicted by a "
        "fit without it; without e·R: the same fit with no per-request term, to show what that term buys; "
        "prior bias: mean signed error, positive = predicts too slow.[/]"
    )
    console.print(f"wrote {path}; use it with: shadow replay TRACE --cost-profile {path}")


def _percent(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def _command(args: argparse.Namespace, layers: int) -> str:
    """The command line that reproduces this profile, every option spelled out."""
    options = [
        f"--model {args.model}",
        f"--device {args.device}",
        f"--layers {layers}",
        f"--dtype {args.dtype}",
        f"--max-batched-tokens {args.max_batched_tokens}",
        f"--max-context {args.max_context}",
        f"--max-decodes {args.max_decodes}",
        f"--seed {args.seed}",
        f"--warmup {args.warmup}",
        f"--repeats {args.repeats}",
    ]
    if args.device == "cpu":
        options.append(f"--threads {args.threads}")
    if args.hardware:
        options.append(f"--hardware {args.hardware}")
    return "shadow profile " + " ".join(options)
