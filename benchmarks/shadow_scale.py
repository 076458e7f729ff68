"""How many engines one core of the shadow keeps up with, at 20 candidate configurations per window.

An engine's mirror stream is made the way a production engine would make it, at production scale: the
bundled Azure conversation trace served by Llama-2-7B on an A100 (roofline cost, vLLM defaults, KV capacity
from memory), with the simulator standing in for the engine. (The shadow cannot tell: a stream is arrivals,
steps with their batches, preemptions and finishes, and finishes.) Then, on one pinned core:

  ingest      the stream through the shadow's core (sequencing, request table, windows, calibration), no
              evaluation: CPU seconds per second of engine traffic;
  evaluate    every window as the shadow evaluates it: the self replay in step space and in time, and the
              candidates of the grid (20 configurations in all, the current one included), plus the
              relaxation bound of the optimum (CP-SAT runs on its own budget; see RESULTS-shadow.md);
              CPU seconds per window, so windows per second;
  end to end  N engines' streams through one core (ingest, then every window evaluated on one worker
              thread) against the traffic time they cover.

Engines per core = 1 / (ingest seconds per traffic second + evaluation seconds per window / window length),
ingest and evaluation each the median of --rounds rounds (default 3).

  fleet       with --fleet N: N shadow actors, one core each, engines placed as the senders place them
              (rendezvous hashing of `model[engine]`, adapters.ray_transport.owner_of): the engines per actor for
              --fleet-engines engines, and what the fleet keeps up with in total, its busiest member at one
              core's capacity as measured above (the placement is computed, the capacity measured).

    python benchmarks/shadow_scale.py                  # 10 s windows, 600 s of traffic per engine
    python benchmarks/shadow_scale.py --engines 100 --seconds 60 --json results.json
    python benchmarks/shadow_scale.py --fleet 4 --fleet-engines 1000 --skip-end-to-end
    python benchmarks/shadow_scale.py --skip-end-to-end --against 9ba8dc6   # a revision's evaluation beside

With --against REV, every window is also evaluated by REV's evaluation (shadow/evaluation/evaluate.py and
step_match.py, solver/bounds.py, loaded from git beside this tree's; the simulator and the rest are this tree's),
alternating with this tree's in one process: every outcome, fidelity figure and bound must be equal (the solve
times aside), and the CPU of each side is reported.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.revision_modules import ROOT, load_revision_modules
from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    Event,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.adapters.ray_transport import owner_of
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.evaluation.candidates import SearchSpace, build_candidates
from vllm_shadow.evaluation.evaluate import Slo, check_fidelity, run_candidates, solve_window_optimum
from vllm_shadow.runtime.core import EvaluationSettings, ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.solver.simulator import simulate
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.windows import TrafficWindow, WindowRules

MODEL, GPU, BLOCK = "llama-2-7b", "a100", 16
# The shadow's default grid, bounded at 20 configurations as a deployment bounds it (`max_candidates`): the grid
# gains toggles over time, and this benchmark's unit is 20 configurations per window, whichever they are.
SPACE = SearchSpace(max_candidates=20)
SLO = Slo(ttft_seconds=2.0, tpot_seconds=0.1)


def engine_stream(seconds: float, rate_scale: float) -> tuple[list[Event], EngineInfo]:
    """A mirror stream of `seconds` of the trace served by the modelled engine, in the hook's order."""
    arch = load_model(MODEL)
    hw = get_hardware(GPU)
    settings = SchedulerSettings(max_model_len=4096)
    cost = roofline_prior(arch, hw, 1, max_batched_tokens=settings.max_num_batched_tokens)
    blocks = kv_capacity_blocks(arch, hw, block_size=BLOCK)
    trace = read_trace(resolve_trace("azure-conv"), end=seconds * rate_scale, rate_scale=rate_scale)
    requests = [
        dataclasses.replace(
            r, prompt_tokens=min(r.prompt_tokens, 3000), output_tokens=min(r.output_tokens or 1, 1000)
        )
        for r in trace.requests
    ]
    policy = (
        f"vllm(max_num_seqs={settings.max_num_seqs},max_num_batched_tokens={settings.max_num_batched_tokens})"
    )
    result = simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=BLOCK, record_steps=True)
    steps = result.steps or []
    starts = [s.start_time for s in steps]
    ends = [s.start_time + s.duration for s in steps]
    arrivals_at: dict[int, list[RequestArrival]] = defaultdict(list)
    finishes_at: dict[int, list[RequestFinish]] = defaultdict(list)
    records = {r.request_id: r for r in result.requests}
    for r in requests:
        # The simulator feeds a request to the first step starting at or after its arrival.
        arrivals_at[bisect.bisect_left(starts, records[r.request_id].arrival)].append(
            RequestArrival(r.request_id, r.time, r.prompt_tokens, max_tokens=r.output_tokens)
        )
        end = bisect.bisect_left(
            ends, records[r.request_id].finish - 1e-9
        )  # the step that emitted its last token
        finishes_at[end].append(RequestFinish(r.request_id, records[r.request_id].finish, r.output_tokens))
    config = json.loads(
        (Path(__file__).resolve().parent.parent / "costmodel/data/models/llama-2-7b.json").read_text()
    )
    info = EngineInfo(MODEL, BLOCK, blocks, settings, "0", config)
    events: list[Event] = [info]
    for i, step in enumerate(steps):
        events += arrivals_at.get(i, [])
        events += finishes_at.get(i, [])
        events.append(
            EngineStep(
                i,
                step.start_time,
                step.duration,
                step.scheduled_tokens,
                step.preempted,
                finished=tuple(f.request_id for f in finishes_at.get(i, [])),
            )
        )
    return events, info


def batches_of(events: list[Event], source: str, engine: str, size: int = 1024) -> list[EventBatch]:
    """The stream as a publisher sends it, relabelled as engine `engine`."""
    relabelled = [dataclasses.replace(e, engine=engine) if isinstance(e, EngineInfo) else e for e in events]
    return [
        EventBatch(relabelled[i : i + size], source, n) for n, i in enumerate(range(0, len(relabelled), size))
    ]


def pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="traffic per engine (default 600)")
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument("--rate-scale", type=float, default=1.0, help="denser arrivals than the trace's")
    parser.add_argument("--engines", type=int, default=20, help="engines in the end-to-end run (default 20)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="ingest and evaluate this many times; medians (default 3)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--fleet", type=int, default=0, help="also place engines over a fleet of N actors")
    parser.add_argument("--fleet-engines", type=int, default=1000, help="engines placed over the fleet")
    parser.add_argument("--skip-end-to-end", action="store_true", help="leave out the end-to-end run")
    parser.add_argument("--against", metavar="REV", help="also evaluate with a git revision's evaluation")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    core_id = pin_to_one_core()

    started = time.perf_counter()
    events, info = engine_stream(args.seconds, args.rate_scale)
    steps = sum(isinstance(e, EngineStep) for e in events)
    requests = sum(isinstance(e, RequestArrival) for e in events)
    traffic = max(e.start_time + e.duration for e in events if isinstance(e, EngineStep))
    print(
        f"stream: {requests} requests, {steps} steps, {len(events)} events over {traffic:.0f}s of engine time "
        f"({MODEL} on {GPU}, {info.num_kv_blocks} KV blocks; made in {time.perf_counter() - started:.1f}s); "
        f"pinned to core {core_id}",
        flush=True,
    )
    plain = [name for name, compiled in compiled_modules().items() if compiled is False]
    if plain:
        print(
            f"warning: running as plain Python: {', '.join(plain)} (rebuild: make .venv/.compiled)",
            flush=True,
        )
    rules = WindowRules(seconds=args.window_seconds)
    candidates = build_candidates(info.scheduler, SPACE)
    assert len(candidates) == 20, len(candidates)

    # Ingest alone, then every window's evaluation (self replay in step space and in time, the 19 other
    # candidates, the bound), each `--rounds` times: the figures are the medians of the rounds (this is a shared
    # machine; a round's CPU time varies with its neighbours), the first round's windows evaluated.
    tracker_prior = roofline_prior(load_model(MODEL), get_hardware(GPU), 1)
    ingest_rounds: list[float] = []
    windows: list[TrafficWindow] = []
    for round_ in range(args.rounds):
        t0 = time.process_time()
        tracker = EngineTracker(info, rules=rules, prior=tracker_prior, clock=time.monotonic)
        for event in events[1:]:
            tracker.apply(event)
        tracker.flush()
        ingest_rounds.append(time.process_time() - t0)
        if round_ == 0:
            windows = tracker.take_ready()
    ingest_cpu = statistics.median(ingest_rounds)

    others = [c.policy for c in candidates[1:]]
    eval_rounds, per_window = [], []
    for _ in range(args.rounds):
        per_window, matched, compared, sizes = [], 0, 0, []
        for window in windows:
            t0 = time.process_time()
            fidelity = check_fidelity(window, SLO)
            run_candidates(window, others, SLO)
            solve_window_optimum(window, time_limit=1.0, max_requests=0)
            per_window.append(time.process_time() - t0)
            matched += fidelity.steps_matched
            compared += fidelity.steps_compared
            sizes.append(window.num_requests)
        eval_rounds.append(statistics.fmean(per_window))
    eval_cpu = statistics.median(eval_rounds)
    ingest_per_second = ingest_cpu / traffic
    engines_per_core = 1 / (ingest_per_second + eval_cpu / args.window_seconds)
    rounds = f" (median of {args.rounds} rounds: {_spread(ingest_rounds, 1)} s)" if args.rounds > 1 else ""
    print(
        f"ingest: {ingest_cpu:.2f} CPU s for {traffic:.0f} s of traffic ({len(events) / ingest_cpu:,.0f} events/s)"
        f"{rounds}: {ingest_per_second * 1e3:.2f} ms per engine-second",
        flush=True,
    )
    rounds = f" (median of {args.rounds} rounds: {_spread(eval_rounds, 1e3)} ms)" if args.rounds > 1 else ""
    print(
        f"evaluate: {len(windows)} windows of {statistics.fmean(sizes):.0f} requests (max {max(sizes)}), "
        f"{eval_cpu * 1e3:.1f} ms CPU each{rounds} (last round's p90 "
        f"{sorted(per_window)[int(0.9 * len(per_window))] * 1e3:.1f} ms) "
        f"for 20 configurations: {1 / eval_cpu:.1f} windows/s per core; self replay {matched}/{compared} steps; "
        f"not evaluated: {dict(tracker.stats.windows_skipped) or 'none'}",
        flush=True,
    )
    print(
        f"=> one core keeps up with {engines_per_core:.0f} engines (20 candidates, {args.window_seconds:g} s windows)"
    )

    results = summary_results(args, info, traffic, requests, steps, events, windows, tracker, sizes) | {
        "rounds": args.rounds,
        "ingest_cpu_seconds": ingest_cpu,
        "ingest_cpu_seconds_by_round": ingest_rounds,
        "evaluation_cpu_seconds_per_window_by_round": eval_rounds,
        "ingest_events_per_second": len(events) / ingest_cpu,
        "evaluation_cpu_seconds_per_window": eval_cpu,
        "windows_per_second_per_core": 1 / eval_cpu,
        "engines_per_core_at_20_candidates": engines_per_core,
        "self_replay_steps_matched": [matched, compared],
    }
    if args.fleet:
        results["fleet"] = fleet_figures(args.fleet, args.fleet_engines, engines_per_core)
    if args.against:
        results["against"] = evaluation_against(args.against, windows, others)
    if not args.skip_end_to_end:
        results["end_to_end"] = end_to_end(args, events, rules, traffic)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def end_to_end(args: argparse.Namespace, events: list[Event], rules: WindowRules, traffic: float) -> dict:
    """N engines' streams through one core (ingest, then every window evaluated on one worker thread)."""
    config = ShadowConfig(
        windows=rules,
        space=SPACE,
        hardware=GPU,
        evaluation=EvaluationSettings(optimal=False, candidate_tasks=1, max_in_flight=1, max_queued=100_000),
    )
    shadow = ShadowCore(config, LocalTasks(1))
    streams = [batches_of(events, f"host:{n}", str(n)) for n in range(args.engines)]
    t0, c0 = time.perf_counter(), time.process_time()
    for group in zip(*streams, strict=True):
        for batch in group:
            shadow.ingest(batch)
        shadow.tick()
    shadow.flush()
    while not shadow.idle():
        shadow.tick()
        time.sleep(0.001)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    snapshot = shadow.snapshot()
    evaluated = sum(e.windows_evaluated for e in snapshot.engines)
    reasons: dict[str, int] = defaultdict(int)
    for e in snapshot.engines:
        for reason, n in e.windows_skipped.items():
            reasons[reason] += n
    skipped = sum(reasons.values())
    print(
        f"end to end: {args.engines} engines x {traffic:.0f} s of traffic on one core in {wall:.1f} s wall "
        f"({cpu:.1f} s CPU): {evaluated} windows evaluated, {skipped} skipped {dict(reasons) or ''}, "
        f"{evaluated / wall:.1f} windows/s; {args.engines * traffic / wall:.0f} engine-seconds per second",
        flush=True,
    )
    return {
        "engines": args.engines,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "windows_evaluated": evaluated,
        "windows_skipped": dict(reasons),
        "engine_seconds_per_second": args.engines * traffic / wall,
    }


def _spread(values: list[float], scale: float) -> str:
    """The rounds' figures, scaled, in the order they ran."""
    return ", ".join(f"{v * scale:.2f}" for v in values)


def revision_evaluation(revision: str) -> Any:
    """The module `vllm_shadow.evaluation.evaluate` of a git revision, with that revision's step comparison,
    bounds and run sharing, loaded beside this tree's under private names; everything else (the simulator, the result
    types, so that outcomes compare) is this tree's."""
    files = [("bounds", "solver/bounds.py", ()), ("step_match", "shadow/evaluation/step_match.py", ())]
    redirected = [
        ("vllm_shadow.solver.bounds", "_revision_bounds"),
        ("vllm_shadow.evaluation.step_match", "_revision_step_match"),
    ]
    shared_runs = "shadow/evaluation/shared_runs.py"
    if subprocess.run(["git", "cat-file", "-e", f"{revision}:{shared_runs}"], cwd=ROOT).returncode == 0:
        files.append(("shared_runs", shared_runs, ()))
        redirected.append(("vllm_shadow.evaluation.shared_runs", "_revision_shared_runs"))
    files.append(("evaluate", "shadow/evaluation/evaluate.py", tuple(redirected)))
    return load_revision_modules(revision, files)["evaluate"]


def evaluation_of(evaluate: Any, window: TrafficWindow, others: list) -> str:
    """Everything the shadow exports of a window's evaluation, as text (the optimum's solve times aside)."""
    fidelity = evaluate.check_fidelity(window, SLO)
    outcomes = evaluate.run_candidates(window, others, SLO)
    optimum = evaluate.solve_window_optimum(window, time_limit=1.0, max_requests=0)
    bounds = [
        None if o is None else dataclasses.replace(o, solve_seconds=0.0)
        for o in (optimum.unconstrained, optimum.constrained)
    ]
    return repr((fidelity, outcomes, bounds))


def evaluation_against(revision: str, windows: list[TrafficWindow], others: list) -> dict:
    """Each window evaluated by the revision's evaluation and by this tree's, alternating: equal figures, and
    the CPU of each."""
    import vllm_shadow.evaluation.evaluate as ours

    theirs = revision_evaluation(revision)
    cpu = {"theirs": 0.0, "ours": 0.0}
    differ = []
    for window in windows:
        texts = {}
        for side, evaluate in (("theirs", theirs), ("ours", ours)):
            t0 = time.process_time()
            texts[side] = evaluation_of(evaluate, window, others)
            cpu[side] += time.process_time() - t0
        if texts["theirs"] != texts["ours"]:
            differ.append(window.index)
    n = len(windows)
    print(
        f"against {revision}: {n - len(differ)}/{n} windows evaluate to the same figures "
        f"{'(differ: ' + str(differ) + ')' if differ else '(every outcome, fidelity figure and bound)'}; "
        f"CPU per window {cpu['theirs'] / n * 1e3:.1f} ms ({revision}) -> {cpu['ours'] / n * 1e3:.1f} ms "
        "(this tree), alternating",
        flush=True,
    )
    return {
        "revision": revision,
        "windows_equal": n - len(differ),
        "windows_differing": differ,
        "cpu_seconds_per_window": {revision: cpu["theirs"] / n, "this tree": cpu["ours"] / n},
    }


def compiled_modules() -> dict[str, bool | None]:
    """Which of the compiled modules run (a stale or missing build falls back to plain Python, several times
    slower: a figure measured so says nothing of the compiled code); None for a module that has no compiled
    build (an older revision's, in `scale_against.py`)."""
    from vllm_shadow.costmodel import linear
    from vllm_shadow.solver import kv_cache, simulator
    from vllm_shadow.tracking import engine_state

    modules = {"simulator": simulator, "kv_cache": kv_cache, "engine_state": engine_state, "linear": linear}
    return {name: getattr(module, "COMPILED", None) for name, module in modules.items()}


def summary_results(
    args: argparse.Namespace,
    info: EngineInfo,
    traffic: float,
    requests: int,
    steps: int,
    events: list[Event],
    windows: list,
    tracker: EngineTracker,
    sizes: list[int],
) -> dict:
    return {
        "compiled": compiled_modules(),
        "model": MODEL,
        "gpu": GPU,
        "traffic_seconds": traffic,
        "requests": requests,
        "steps": steps,
        "events": len(events),
        "window_seconds": args.window_seconds,
        "windows": len(windows),
        "windows_not_evaluated": dict(tracker.stats.windows_skipped),
        "mean_window_requests": statistics.fmean(sizes),
    }


def fleet_figures(actors: int, engines: int, engines_per_core: float) -> dict:
    """How `engines` engines spread over `actors` members as the senders place them, and what the fleet keeps
    up with when each member has one core of the measured capacity: the busiest member is the limit."""
    members = [f"vllm-shadow-{i}" for i in range(actors)]
    keys = [f"{MODEL}[{i}]" for i in range(engines)]
    shares = Counter(owner_of(key, members) for key in keys)
    busiest = max(shares.values())
    total = int(engines_per_core * engines / busiest)
    per_actor = sorted(shares.values())
    print(
        f"fleet: {actors} actors, {engines} engines placed by rendezvous hashing: {per_actor[0]}-{per_actor[-1]} "
        f"per actor (mean {engines / actors:.0f}); at {engines_per_core:.0f} engines per core the fleet keeps up "
        f"with about {total} engines in total ({engines_per_core:.0f} on its busiest actor)",
        flush=True,
    )
    return {
        "actors": actors,
        "engines_placed": engines,
        "engines_per_actor": dict(sorted(shares.items())),
        "engines_per_core": engines_per_core,
        "engines_in_total": total,
    }


if __name__ == "__main__":
    sys.exit(main())
