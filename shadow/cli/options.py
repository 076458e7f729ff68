"""Command-line options shared by `shadow serve` and `shadow demo`: windows, search space, objective, optimum."""

from __future__ import annotations

import argparse

from vllm_shadow.evaluation.candidates import SearchSpace
from vllm_shadow.evaluation.evaluate import Slo
from vllm_shadow.evaluation.recommend import Goal
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.solver.policies import split_policies
from vllm_shadow.tracking.windows import WindowRules

OBJECTIVES = {"gpu": "gpu", "ttft": "ttft_p99", "tpot": "tpot_p99"}


def add_shadow_options(parser: argparse.ArgumentParser, *, window_seconds: float = 10.0) -> None:
    group = parser.add_argument_group("windows and evaluation")
    group.add_argument(
        "--window-seconds",
        type=float,
        default=window_seconds,
        help=f"close a window after this much engine time (default {window_seconds:g})",
    )
    group.add_argument("--window-requests", type=int, help="or after this many requests arrived")
    group.add_argument(
        "--hardware", default="h100", help="hardware for the cost prior until calibration (default h100)"
    )
    group.add_argument(
        "--candidates",
        default="",
        help="extra policies to try besides the grid, comma-separated, e.g. 'vllm(max_num_seqs=512)'",
    )
    group.add_argument(
        "--seqs-factors",
        default="0.5,1,2,4",
        help="max_num_seqs of the grid, as factors of the engine's (default 0.5,1,2,4)",
    )
    group.add_argument(
        "--budget-factors",
        default="0.5,1,2",
        help="max_num_batched_tokens of the grid, as factors of the engine's (default 0.5,1,2)",
    )
    group.add_argument(
        "--objective",
        default="gpu",
        help="what to minimise: gpu, ttft, tpot (p99), or weights such as 'gpu=1,ttft=0.5' (default gpu)",
    )
    group.add_argument(
        "--ttft-slo", type=float, help="TTFT target in seconds; candidates may not lose attainment"
    )
    group.add_argument("--tpot-slo", type=float, help="TPOT target in seconds")
    group.add_argument(
        "--min-windows", type=int, default=3, help="windows of evidence before recommending (default 3)"
    )
    group.add_argument("--no-optimal", action="store_true", help="skip the optimum and its bounds")
    group.add_argument(
        "--optimal-time-limit", type=float, default=5.0, help="CP-SAT seconds per window (default 5)"
    )
    group.add_argument(
        "--optimal-max-requests",
        type=int,
        default=64,
        help="larger windows get the relaxation bound only (default 64)",
    )
    group.add_argument(
        "--optimal-every",
        type=int,
        default=1,
        help="CP-SAT on every k-th window, the relaxation bound on the others (default 1: every window)",
    )
    group.add_argument(
        "--evaluation-timeout",
        type=float,
        default=60.0,
        help="give a window's evaluation up after (default 60 s)",
    )


def _factors(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty")
    return values


def parse_goal_weights(text: str) -> dict[str, float]:
    text = text.strip().lower()
    if text in OBJECTIVES:
        return {OBJECTIVES[text]: 1.0}
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in OBJECTIVES:
            raise ValueError(f"bad objective term {item!r}: expected gpu=W, ttft=W or tpot=W")
        try:
            weights[OBJECTIVES[name.strip()]] = float(value)
        except ValueError:
            raise ValueError(f"bad objective weight in {item!r}") from None
    return weights


def shadow_config(args: argparse.Namespace) -> ShadowConfig:
    weights = {"gpu": 0.0, "ttft_p99": 0.0, "tpot_p99": 0.0} | parse_goal_weights(args.objective)
    return ShadowConfig(
        windows=WindowRules(seconds=args.window_seconds, requests=args.window_requests),
        space=SearchSpace(
            max_num_seqs_factors=_factors(args.seqs_factors, "--seqs-factors"),
            batched_tokens_factors=_factors(args.budget_factors, "--budget-factors"),
            extra=tuple(split_policies(args.candidates)),
        ),
        goal=Goal(
            **weights,
            slo=Slo(args.ttft_slo, args.tpot_slo),
            min_windows=args.min_windows,
            history=max(12, args.min_windows),
        ),
        evaluation=EvaluationSettings(
            optimal=not args.no_optimal,
            optimal_time_limit=args.optimal_time_limit,
            optimal_max_requests=args.optimal_max_requests,
            optimal_every=args.optimal_every,
            timeout_seconds=args.evaluation_timeout,
        ),
        hardware=args.hardware,
    )
