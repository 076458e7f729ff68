"""`shadow report`: a self-contained HTML report of one mirror stream, recorded from a real engine or replayed
from a trace by the simulator."""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

from vllm_shadow.adapters.events import EngineInfo, SchedulerSettings
from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.cli.options import add_optimum_limits, add_tiny_engine_options, add_window_options

# The measured CPU profile of the tiny model, shipped as package data of the cost model.
DEFAULT_PROFILE = files("vllm_shadow.costmodel") / "data" / "profiles" / "tiny-llama-cpu.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="an HTML report of a recorded mirror stream or a trace replay: gaps, latency, KV, optimum, advice",
        description="Evaluate a mirror stream window by window as the live shadow does, and write one "
        "self-contained HTML file: the recommendation with its evidence, fidelity, latency per candidate, the "
        "cost gap over time, KV use, and the optimal schedule against the engine's.",
    )
    parser.add_argument("stream", nargs="?", help="a recorded mirror stream (.jsonl or .jsonl.gz)")
    parser.add_argument("-o", "--output", default="shadow-report.html", help="HTML file to write")
    evaluation = parser.add_argument_group("windows and evaluation")
    add_window_options(evaluation, window_seconds=1.0, hardware="cpu")
    add_optimum_limits(evaluation, optimal_time_limit=2.0, optimal_max_requests=40)
    replay = parser.add_argument_group("replay a trace instead (the simulator plays the engine)")
    replay.add_argument("--trace", help="a bundled trace name or a trace file")
    replay.add_argument("--limit", type=int, default=120, help="requests of the trace (default 120)")
    replay.add_argument(
        "--seconds", type=float, default=12.0, help="squeeze the arrivals into this many seconds"
    )
    add_tiny_engine_options(replay)
    parser.set_defaults(func=run)


def _replayed(args: argparse.Namespace) -> list:
    from vllm_shadow.adapters.traces import read_trace, resolve_trace
    from vllm_shadow.adapters.vllm.engine_run import TINY_LLAMA, trace_workload
    from vllm_shadow.costmodel.profile import load_profile
    from vllm_shadow.report.replayed import replayed_stream

    info = EngineInfo(
        model="tiny-llama (replayed)",
        block_size=128,
        num_kv_blocks=args.kv_blocks,
        scheduler=SchedulerSettings(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=2048,
        ),
        model_config=json.loads((TINY_LLAMA / "config.json").read_text()),
    )
    trace = read_trace(resolve_trace(args.trace), limit=args.limit)
    requests = trace_workload(trace.requests, seconds=args.seconds)
    return replayed_stream(info, requests, load_profile(DEFAULT_PROFILE).cost)


def run(args: argparse.Namespace) -> int:
    from vllm_shadow.report.analysis import analyse
    from vllm_shadow.report.html import render

    if (args.stream is None) == (args.trace is None):
        raise ValueError("give a recorded stream or --trace, not both")
    if args.stream:
        events, source = list(read_events(args.stream)), f"recorded stream {Path(args.stream).name}"
        if not events:
            raise ValueError(f"{args.stream}: no events to report (the recording holds only its header)")
        if not isinstance(events[0], EngineInfo):
            raise ValueError(f"{args.stream}: the first event is not the engine's announcement (EngineInfo)")
    else:
        events = _replayed(args)
        source = f"{args.trace} replayed ({args.limit} requests in {args.seconds:g} s) by the simulator"
    analysis = analyse(
        events,
        window_seconds=args.window_seconds,
        hardware=args.hardware,
        optimal_time_limit=args.optimal_time_limit,
        optimal_max_requests=args.optimal_max_requests,
    )
    html = render(
        analysis,
        source,
        optimal_max_requests=args.optimal_max_requests,
        optimal_time_limit=args.optimal_time_limit,
    )
    Path(args.output).write_text(html)
    print(f"wrote {args.output}: {len(analysis.evaluations)} windows; {analysis.verdict.reason}")
    return 0
