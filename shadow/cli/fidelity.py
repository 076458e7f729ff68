"""`shadow fidelity RECORDING`: does the simulator reproduce this engine, step for step?

Every recommendation rests on the self replay: the simulator, run with the engine's own settings on the engine's
own traffic, must schedule what the engine scheduled. This command replays a recorded mirror stream (the
`SHADOW_RECORD` file of an engine running `vllm_shadow.MirrorScheduler`) in step space, where each request enters
before the same step at which the engine received it, and compares every non-empty step: which requests ran,
how many tokens each, which were preempted. Run it before trusting a recommendation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_shadow.adapters.recorder import read_events
from vllm_shadow.evaluation.recorded_run import MirroredRun, check_run
from vllm_shadow.evaluation.step_match import StepComparison, StepMismatch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fidelity",
        help="replay a recorded mirror stream and compare the simulator with the engine step by step",
        description="Replay a recorded mirror stream (SHADOW_RECORD of an engine running "
        "--scheduler-cls vllm_shadow.MirrorScheduler) with the engine's own settings, in step space, and "
        "compare every non-empty step: batch membership, tokens per request, preemption victims. Prints the "
        "steps compared, the steps identical and the first divergence. Exit status 0 when every step is "
        "identical, 1 when one differs, 2 on bad input.",
    )
    parser.add_argument("recording", help="a recorded mirror stream (.jsonl or .jsonl.gz)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--divergences", type=int, default=1, metavar="N", help="how many diverging steps to list (default 1)"
    )
    parser.set_defaults(func=run)


def _requests_involved(mismatch: StepMismatch) -> list[str]:
    """The requests on which the two sides disagree in that step."""
    real, simulated = mismatch.real or {}, mismatch.simulated or {}
    differ = {r for r in real.keys() | simulated.keys() if real.get(r) != simulated.get(r)}
    differ |= set(mismatch.real_preempted) ^ set(mismatch.simulated_preempted)
    return sorted(differ)


def _divergence(mismatch: StepMismatch, run: MirroredRun) -> dict[str, Any]:
    real_step = run.steps[mismatch.index] if mismatch.index < len(run.steps) else None
    return {
        "step": mismatch.index,  # among the non-empty steps, from 0
        "engine_step": real_step.step if real_step is not None else None,  # the engine's own step number
        "what": list(mismatch.kinds),
        "requests": _requests_involved(mismatch),
        "engine": {"scheduled_tokens": mismatch.real, "preempted": list(mismatch.real_preempted)},
        "simulator": {
            "scheduled_tokens": mismatch.simulated,
            "preempted": list(mismatch.simulated_preempted),
        },
        "engine_cached_tokens": dict(real_step.cached_tokens) if real_step is not None else {},
    }


def fidelity_report(path: str, comparison: StepComparison, run: MirroredRun, divergences: int) -> dict:
    assert run.info is not None
    compared = max(comparison.real_steps, comparison.simulated_steps)
    listed = [_divergence(m, run) for m in comparison.mismatches[: max(divergences, 1)]]
    return {
        "recording": path,
        "engine": asdict(run.info.scheduler) | {"num_kv_blocks": run.info.num_kv_blocks},
        "block_size": run.info.block_size,
        "requests": len(run.requests),
        "requests_finished": len(run.finishes),
        "steps_compared": compared,
        "steps_identical": comparison.matched,
        "engine_steps": comparison.real_steps,
        "simulated_steps": comparison.simulated_steps,
        "empty_engine_steps": run.empty_steps,
        "identical_ratio": comparison.match_ratio,
        "first_divergence": listed[0] if listed else None,
        "divergences": listed,
        "diverging_steps": len(comparison.mismatches),
    }


def _print_text(report: dict) -> None:
    engine = report["engine"]
    print(
        f"{report['recording']}: {report['requests']} requests ({report['requests_finished']} finished), "
        f"{engine['policy']}, max_num_seqs {engine['max_num_seqs']}, max_num_batched_tokens "
        f"{engine['max_num_batched_tokens']}, {engine['num_kv_blocks']} KV blocks of {report['block_size']}, "
        f"prefix caching {'on' if engine['enable_prefix_caching'] else 'off'}"
    )
    print(
        f"steps compared {report['steps_compared']}, identical {report['steps_identical']} "
        f"({report['identical_ratio']:.2%}); {report['empty_engine_steps']} empty engine steps not compared"
    )
    for d in report["divergences"]:
        print(
            f"divergence at step {d['step']} (engine step {d['engine_step']}): {', '.join(d['what'])} "
            f"on {', '.join(d['requests']) or '-'}\n"
            f"  engine    ran {d['engine']['scheduled_tokens']} preempting {d['engine']['preempted']}\n"
            f"  simulator ran {d['simulator']['scheduled_tokens']} preempting {d['simulator']['preempted']}"
        )
    if report["first_divergence"] is None:
        print("every step identical: the self replay reproduces this engine")


def run(args: argparse.Namespace) -> int:
    path = Path(args.recording)
    run_ = MirroredRun.from_events(read_events(path))
    if run_.info is None:
        raise ValueError(f"{path}: no EngineInfo in the recording: the engine's settings are unknown")
    try:
        comparison = check_run(run_)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    report = fidelity_report(str(path), comparison, run_, args.divergences)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_text(report)
    return 0 if report["first_divergence"] is None else 1
