"""The option groups that more than one command takes, and what turns them into the objects the commands use.

- trace window and engine being modelled: `shadow replay` and `shadow optimal`;
- the replayed or demonstrated tiny engine: `shadow demo` and `shadow report`;
- windows and evaluation: `shadow serve` and `shadow demo` (window length, cost prior and CP-SAT limits also
  `shadow report`);
- where the shadow's Ray actor lives: `shadow serve` and `shadow status`.
A command's own options stay in its module; no command imports another's.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, replace
from enum import StrEnum

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import Trace, read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.profile import load_profile
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.evaluation.candidates import SearchSpace
from vllm_shadow.evaluation.recommend import MIN_CALIBRATION_STEPS, Goal
from vllm_shadow.evaluation.results import Slo
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig
from vllm_shadow.solver.policies import split_policies
from vllm_shadow.tracking.tracker import DEFAULT_LIMITS
from vllm_shadow.tracking.windows import WindowRules

# ---- trace window and engine being modelled: `shadow replay` and `shadow optimal` ---------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """Everything a replay needs besides the requests and the policy: the engine being modelled."""

    model: str
    gpu: str
    tp: int
    block_size: int
    num_kv_blocks: int
    cost: LinearCostModel
    cost_source: str
    max_model_len: int  # vLLM's: the model's context unless --max-model-len says otherwise


PREFIX_CACHING_HELP = (
    "model vLLM's prefix caching: a request's prompt blocks already in the KV cache (shared with an earlier "
    "request, or its own before a preemption) are not computed again. Default: on when the trace carries block "
    "hashes (Mooncake's hash_ids), as vLLM's own default is on; off for traces without them"
)


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "trace",
        help="a trace file (Azure, Mooncake, BurstGPT or Vidur format, detected from "
        "its header) or a bundled name: azure-conv, azure-code, mooncake-conv",
    )
    group = parser.add_argument_group("trace window")
    group.add_argument("--start", type=float, help="start of the time slice, seconds from the trace start")
    group.add_argument(
        "--end", type=float, help="end of the time slice (exclusive), seconds from the trace start"
    )
    group.add_argument("--limit", type=int, help="keep the first N requests (after slicing)")
    group.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the arrival rate (2 = arrivals twice as dense); default 1",
    )
    group.add_argument(
        "--max-prompt-tokens", type=int, help="cap prompt lengths (capped requests are counted)"
    )
    group.add_argument(
        "--max-output-tokens", type=int, help="cap output lengths (capped requests are counted)"
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine being modelled")
    group.add_argument(
        "--model",
        default="llama-2-7b",
        help="a bundled model name or a path to a Hugging Face config.json (default llama-2-7b)",
    )
    group.add_argument(
        "--gpu", default="a100", help="hardware: a100, h100, h200, l40s, a10g, cpu (default a100)"
    )
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    group.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    group.add_argument(
        "--kv-blocks",
        type=int,
        help="KV blocks as vLLM counts them (num_gpu_blocks); default: computed from memory",
    )
    group.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="gpu_memory_utilization used to compute the KV blocks (default 0.9)",
    )
    group.add_argument("--cost-profile", help="a profile file from `shadow profile`; default: roofline prior")
    group.add_argument(
        "--max-model-len",
        type=int,
        help="vLLM's max_model_len (default: the model's context, max_position_embeddings): a longer prompt "
        "is rejected as vLLM rejects it, an output is cut where the sequence reaches it",
    )


def load_window(args: argparse.Namespace) -> Trace:
    return read_trace(
        resolve_trace(args.trace),
        start=args.start,
        end=args.end,
        limit=args.limit,
        rate_scale=args.rate_scale,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
    )


def engine_setup(args: argparse.Namespace) -> Setup:
    arch = load_model(args.model)
    hw = get_hardware(args.gpu)
    if args.cost_profile:
        profile = load_profile(args.cost_profile)
        cost, source = profile.cost, f"profile {args.cost_profile} ({profile.model} on {profile.hardware})"
    else:
        cost, source = (
            roofline_prior(arch, hw, args.tp),
            f"roofline prior ({arch.name} on {hw.name}, TP {args.tp})",
        )
    # Only an absent --kv-blocks asks for the estimate: 0 must not quietly mean "compute them".
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise ValueError(
            f"--kv-blocks must be >= 1, got {args.kv_blocks} (omit it to compute them from memory)"
        )
    blocks = args.kv_blocks
    if blocks is None:
        blocks = kv_capacity_blocks(
            arch, hw, tp=args.tp, block_size=args.block_size, memory_fraction=args.memory_fraction
        )
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(
            f"--max-model-len must be >= 2 (a prompt token and an output token), got {args.max_model_len}"
        )
    max_model_len = args.max_model_len or arch.max_position_embeddings
    return Setup(arch.name, hw.name, args.tp, args.block_size, blocks, cost, source, max_model_len)


class Rejection(StrEnum):
    """Why vLLM would refuse a request of the trace (the counters' keys in tables and `--json`)."""

    # vLLM's input processor (`_validate_prompt_len`): a prompt of max_model_len tokens or more leaves no room
    # for one output token; the request fails before it reaches the scheduler.
    PROMPT_TOO_LONG = "prompt_too_long"
    # A sequence the whole KV cache cannot hold. vLLM never meets one: it refuses to start when the KV cache
    # cannot hold one request of max_model_len tokens (check_enough_kv_cache_memory). A modelled cache smaller
    # than that is the user's choice, so such a request is left out, counted, and the output says so.
    NEVER_FITS_KV_CACHE = "never_fits_kv_cache"


OUTPUT_CAPPED_AT_MAX_MODEL_LEN = "output_capped_at_max_model_len"


@dataclass(frozen=True, slots=True)
class Admitted:
    """The requests vLLM would serve, and the account of those it would not or would cut short."""

    requests: list[RequestArrival]
    rejected: dict[str, int]  # by `Rejection`
    capped: dict[str, int]  # OUTPUT_CAPPED_AT_MAX_MODEL_LEN: outputs vLLM stops at max_model_len


def admit_like_vllm(requests: list[RequestArrival], setup: Setup) -> Admitted:
    """What vLLM does with each request before it is scheduled: refuse a prompt of max_model_len tokens or
    more, stop an output where the sequence reaches max_model_len (its check_stop: FINISHED_LENGTH_CAPPED), and
    (see `Rejection`) leave out a sequence the modelled KV cache can never hold."""
    num_usable_blocks = setup.num_kv_blocks - 1  # vLLM's null block
    kept: list[RequestArrival] = []
    rejected: Counter[str] = Counter()
    capped = 0
    for r in requests:
        if r.prompt_tokens >= setup.max_model_len:
            rejected[Rejection.PROMPT_TOO_LONG] += 1
            continue
        output = r.output_tokens
        if output is not None and r.prompt_tokens + output > setup.max_model_len:
            output = setup.max_model_len - r.prompt_tokens
            capped += 1
        # The last output token is sampled, never computed: the sequence's KV peaks one short of it.
        if output is not None and -(-(r.prompt_tokens + output - 1) // setup.block_size) > num_usable_blocks:
            rejected[Rejection.NEVER_FITS_KV_CACHE] += 1
            continue
        kept.append(r if output == r.output_tokens else replace(r, output_tokens=output))
    return Admitted(
        kept,
        {str(reason): n for reason, n in rejected.items()},
        {OUTPUT_CAPPED_AT_MAX_MODEL_LEN: capped} if capped else {},
    )


def prefix_caching_on(args: argparse.Namespace, trace: Trace) -> bool:
    """--prefix-caching, or its default: on when the trace carries block hashes."""
    if args.prefix_caching is not None:
        return args.prefix_caching == "on"
    return any(r.prefix_block_hashes or r.block_hashes for r in trace.requests)


# ---- windows and evaluation: `shadow serve` and `shadow demo` -------------------------------------------------

OBJECTIVES = {"gpu": "gpu", "ttft": "ttft_p99", "tpot": "tpot_p99"}


# ---- the tiny engine of `shadow demo` and of a replayed `shadow report` -----------------------------------------


def add_tiny_engine_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--max-num-seqs", type=int, default=2, help="the engine's max_num_seqs (default 2)")
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=256, help="the engine's token budget (default 256)"
    )
    group.add_argument(
        "--kv-blocks", type=int, default=64, help="the engine's KV blocks of 128 tokens (default 64)"
    )


# ---- where the shadow's Ray actor lives: `shadow serve` and `shadow status` ------------------------------------


def add_actor_options(group: argparse._ArgumentGroup, *, ray_address_help: str) -> None:
    # Imported here, from the service's Ray-free module: only the commands that reach the actor import Ray.
    from vllm_shadow.runtime.status_endpoint import DEFAULT_NAME, DEFAULT_NAMESPACE

    group.add_argument("--ray-address", help=ray_address_help)
    group.add_argument("--name", default=DEFAULT_NAME, help=f"actor name (default {DEFAULT_NAME})")
    group.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=f"Ray namespace (default {DEFAULT_NAMESPACE})"
    )


# ---- windows and evaluation -----------------------------------------------------------------------------------


def add_window_options(group: argparse._ArgumentGroup, *, window_seconds: float, hardware: str) -> None:
    """Window length and cost prior: what every command that evaluates windows takes."""
    group.add_argument(
        "--window-seconds",
        type=float,
        default=window_seconds,
        help=f"close a window after this much engine time (default {window_seconds:g})",
    )
    group.add_argument(
        "--hardware",
        default=hardware,
        help=f"hardware for the cost prior until calibration (default {hardware})",
    )


def add_optimum_limits(
    group: argparse._ArgumentGroup, *, optimal_time_limit: float, optimal_max_requests: int
) -> None:
    """How much CP-SAT may spend on a window: also what every command that evaluates windows takes."""
    group.add_argument(
        "--optimal-time-limit",
        type=float,
        default=optimal_time_limit,
        help=f"CP-SAT seconds per window (default {optimal_time_limit:g})",
    )
    group.add_argument(
        "--optimal-max-requests",
        type=int,
        default=optimal_max_requests,
        help=f"larger windows get the relaxation bound only (default {optimal_max_requests})",
    )


def add_shadow_options(
    parser: argparse.ArgumentParser,
    *,
    window_seconds: float = 10.0,
    hardware: str = "h100",
    optimal_time_limit: float = 5.0,
    optimal_max_requests: int = 64,
) -> None:
    """Everything the live shadow is configured by (`shadow_config` reads it)."""
    group = parser.add_argument_group("windows and evaluation")
    add_window_options(group, window_seconds=window_seconds, hardware=hardware)
    group.add_argument("--window-requests", type=int, help="or close it after this many requests arrived")
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
    group.add_argument(
        "--min-calibration-steps",
        type=int,
        default=MIN_CALIBRATION_STEPS,
        help="a window is evidence only if the cost model had been fitted on this many of the engine's steps "
        f"when it opened (at most {DEFAULT_LIMITS.calibration_steps_per_second:g} a second of engine time; "
        f"default {MIN_CALIBRATION_STEPS})",
    )
    group.add_argument("--no-optimal", action="store_true", help="skip the optimum and its bounds")
    add_optimum_limits(
        group, optimal_time_limit=optimal_time_limit, optimal_max_requests=optimal_max_requests
    )
    group.add_argument(
        "--optimal-every",
        type=int,
        default=1,
        help="CP-SAT on every k-th window, the relaxation bound on the others (default 1: every window)",
    )
    group.add_argument(
        "--optimal-constrained-cp-sat",
        action="store_true",
        help="CP-SAT under the latency deadlines too (the bound at equal latency; default: its relaxation, "
        "every window)",
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
            min_calibration_steps=args.min_calibration_steps,
        ),
        evaluation=EvaluationSettings(
            optimal=not args.no_optimal,
            optimal_time_limit=args.optimal_time_limit,
            optimal_max_requests=args.optimal_max_requests,
            optimal_every=args.optimal_every,
            optimal_constrained_cp_sat=args.optimal_constrained_cp_sat,
            timeout_seconds=args.evaluation_timeout,
        ),
        hardware=args.hardware,
    )
