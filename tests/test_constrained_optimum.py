"""The live headline (issue 12, items 3 and 5): each window's optimal bound at equal or better latency beside
the unconstrained one, exported and shown first; and the recompute tax the engine paid, from its real steps."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from rich.console import Console

from tests import shadow_support as support
from tests.waiting import drain
from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.candidates import build_candidates
from vllm_shadow.evaluation.evaluate import (
    ENGINE_LATENCY,
    ENGINE_TIME_SLACK,
    Slo,
    check_fidelity,
    engine_deadlines_of,
    engine_replay,
    optimal_problem,
    solve_window_optimum,
    window_deadlines,
)
from vllm_shadow.evaluation.recommend import Goal
from vllm_shadow.evaluation.window import EvaluationSettings, evaluate_window, plan_tasks
from vllm_shadow.readout.console import recompute_line, status_view, summary_view
from vllm_shadow.readout.exporter import exposition
from vllm_shadow.readout.snapshot import to_json
from vllm_shadow.readout.snapshot_json import snapshot_from_json
from vllm_shadow.runtime.core import ShadowConfig, ShadowCore
from vllm_shadow.runtime.tasks import LocalTasks
from vllm_shadow.solver.schedule import replay, schedule_from_steps
from vllm_shadow.tracking.recompute import recomputed_tokens, step_recompute_tax
from vllm_shadow.tracking.windows import WindowRules

# The simulator keeps time in whole picoseconds, the verifier in floats.
SLACK = 1e-6


@pytest.fixture(scope="module")
def windows():
    return {name: support.windows(name, 0.5) for name in support.NAMES}


def _engine_windows(windows, count: int = 3):
    return [w for name in support.NAMES for w in windows[name][:count] if w.arrivals]


def test_the_engine_s_own_schedule_meets_the_deadlines_it_sets(windows) -> None:
    """The deadlines come from the self replay, so the configuration's schedule is in the constrained scope:
    the verifier's own replay of it meets them, within the slack that covers its float arithmetic and no
    more."""
    for window in _engine_windows(windows):
        problem = optimal_problem(window)
        engine = engine_replay(window, record_steps=True)
        deadlines = window_deadlines(problem, engine_deadlines_of(problem, engine), Slo())
        assert deadlines.source == ENGINE_LATENCY
        verified = replay(schedule_from_steps(engine.steps or []), problem, window.cost, deadlines)
        assert verified.feasible, verified.violations[:3]
        for times, due in (
            (verified.finish, deadlines.finish),
            (verified.first_token, deadlines.first_token),
        ):
            assert set(times) == set(due)
            for rid, t in times.items():
                assert due[rid] - ENGINE_TIME_SLACK - 1e-5 <= t <= due[rid], rid
        own = {a.request_id for a in window.arrivals}
        assert own <= set(deadlines.first_token) and own <= set(deadlines.finish)
        replayed = check_fidelity(window, Slo()).self_replay.gpu_seconds
        assert verified.gpu_seconds == pytest.approx(replayed, rel=SLACK)


def test_an_slo_relaxes_the_deadlines_only_up_to_the_slo_and_never_below_the_engine(windows) -> None:
    window = next(w for w in windows["fcfs-kv12"] if len(w.arrivals) > 3)
    problem = optimal_problem(window)
    engine = engine_deadlines_of(problem, engine_replay(window))
    slo = Slo(ttft_seconds=0.05, tpot_seconds=0.01)
    deadlines = window_deadlines(problem, engine, slo)
    arrival = {r.request_id: r.arrival for r in problem.requests}
    output = {r.request_id: r.output_tokens for r in problem.requests}
    for rid, due in deadlines.first_token.items():
        assert due == max(arrival[rid] + 0.05, engine.first_token[rid])
    for rid, due in deadlines.finish.items():
        assert due == pytest.approx(max(arrival[rid] + 0.05 + 0.01 * (output[rid] - 1), engine.finish[rid]))
    assert "SLO" in deadlines.source
    assert any(deadlines.finish[rid] > engine.finish[rid] for rid in deadlines.finish), "the SLO relaxes none"


def test_each_window_gets_both_bounds_and_the_constrained_one_is_never_lower(windows) -> None:
    """A tighter problem never has a lower optimum: at equal latency the bound is at least the unconstrained
    one, and at most the engine's own schedule, which meets the deadlines. With CP-SAT under the deadlines,
    with CP-SAT for the unconstrained bound only (the default), and with relaxations alone (the sampled-out
    windows of `--optimal-every`)."""
    tighter = solved = 0
    for window in _engine_windows(windows, 2):
        replayed = check_fidelity(window, Slo()).self_replay.gpu_seconds
        for max_requests, cp_sat in ((40, True), (40, False), (0, True)):
            optimum = solve_window_optimum(
                window, time_limit=0.5, max_requests=max_requests, constrained_cp_sat=cp_sat
            )
            free, constrained = optimum.unconstrained, optimum.constrained
            assert constrained is not None and constrained.latency == ENGINE_LATENCY
            assert free.latency == "none"
            assert free.bound_gpu_seconds <= constrained.bound_gpu_seconds
            assert constrained.bound_gpu_seconds <= replayed * (1 + SLACK)
            if not math.isnan(constrained.best_gpu_seconds):
                assert constrained.bound_gpu_seconds <= constrained.best_gpu_seconds * (1 + SLACK)
                assert constrained.best_gpu_seconds <= replayed * (1 + SLACK)  # the engine's is a hint
            if max_requests == 0 or not cp_sat:
                assert constrained.method == "relaxation" and constrained.status == "BOUND"
            assert free.method == ("relaxation" if max_requests == 0 else "cp-sat")
            solved += constrained.method == "cp-sat"
            tighter += constrained.bound_gpu_seconds > free.bound_gpu_seconds * (1 + 1e-3)
    assert tighter > 0, "latency constraints never raised the bound: they are not applied"
    assert solved > 0, "CP-SAT never ran under the deadlines"


def test_the_window_evaluation_carries_both_gaps(windows) -> None:
    window = next(w for w in windows["priority-kv16"] if len(w.arrivals) > 3)
    candidates = build_candidates(window.info.scheduler)[:2]
    settings = EvaluationSettings(optimal_time_limit=0.5, optimal_max_requests=0)
    evaluation = evaluate_window(window, candidates, settings, Slo())
    assert evaluation.optimal is not None and evaluation.constrained is not None
    assert 0 <= evaluation.constrained_gap <= evaluation.optimal_gap
    assert evaluation.recompute == window.recompute


# ---- the recompute tax ----------------------------------------------------------------------------------------


def test_a_step_s_recompute_tax_is_its_time_minus_the_time_without_the_recomputation() -> None:
    cost = LinearCostModel(a=1.0, b=0.01, c=0.001, d=1e-5, e=0.1)
    assert recomputed_tokens(computed=0, new=64, dropped_kv=100) == 64
    assert recomputed_tokens(computed=64, new=64, dropped_kv=100) == 36
    assert recomputed_tokens(computed=100, new=1, dropped_kv=100) == 0
    # A victim recomputing 36 of its 64 tokens beside a decode: without them it runs 28 tokens from 100.
    tax = step_recompute_tax(cost, [64, 1], [64, 500], [36, 0], preemptions=1)
    expected = cost.batch_time([64, 1], [64, 500]) - cost.batch_time([28, 1], [100, 500])
    assert tax.gpu_seconds == pytest.approx(expected) and tax.recomputed_tokens == 36 and tax.preemptions == 1
    # A step of recomputation only would not have run at all: its whole time is the tax.
    alone = step_recompute_tax(cost, [50], [0], [50])
    assert alone.gpu_seconds == pytest.approx(cost.batch_time([50], [0]))
    assert step_recompute_tax(cost, [5], [0], [0]).gpu_seconds == 0.0


def test_the_recomputed_tokens_are_what_the_engine_ran_beyond_each_request_s_own_work(windows) -> None:
    """Oracle from the raw stream: a finished request needs prompt + output - 1 tokens computed; whatever the
    engine scheduled beyond that was computed again after a preemption."""
    for name in support.NAMES:
        stream = support.events(name)
        prompt = {e.request_id: e.prompt_tokens for e in stream if isinstance(e, RequestArrival)}
        output = {e.request_id: e.output_tokens for e in stream if isinstance(e, RequestFinish)}
        scheduled: Counter[str] = Counter()
        preemptions = 0
        for e in stream:
            if isinstance(e, EngineStep):
                scheduled.update(e.scheduled_tokens)
                preemptions += len(e.preempted)
        oracle = sum(n - (prompt[r] + output[r] - 1) for r, n in scheduled.items() if r in output)
        tracker = support.tracker(support.info_of(stream), 0.5)
        for event in stream[1:]:
            tracker.apply(event)
        tracker.flush()
        ready = tracker.take_ready()
        assert not tracker.stats.windows_skipped, "a skipped window would hide part of the tax"
        assert sum(w.recompute.recomputed_tokens for w in ready) == oracle, name
        assert sum(w.recompute.preemptions for w in ready) == preemptions, name
        taxed = [w for w in ready if w.recompute.recomputed_tokens]
        assert all(0 < w.recompute.gpu_seconds < w.actual_gpu_seconds for w in taxed), name
        assert all(w.recompute.gpu_seconds == 0 for w in ready if not w.recompute.recomputed_tokens)
    assert oracle > 0, "the crowded stream preempts: the test must see a tax"


# ---- exported and shown first ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot():
    config = ShadowConfig(
        windows=WindowRules(seconds=0.5),
        hardware="cpu",
        evaluation=EvaluationSettings(optimal_time_limit=0.3, optimal_max_requests=12, optimal_every=2),
        goal=Goal(min_windows=2, min_calibration_steps=50),
    )
    core = ShadowCore(config, LocalTasks())
    for batch in support.batches("fcfs-kv6-crowded"):
        core.ingest(batch, "grpc")
    drain(core)
    return core.snapshot()


def test_the_headline_and_the_recompute_tax_are_exported(snapshot) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    engine = snapshot.engines[0]
    last = engine.last
    assert last is not None and last.constrained is not None and last.optimal is not None
    found = {
        s.name: s for family in text_string_to_metric_families(exposition(snapshot)) for s in family.samples
    }
    gap = found["vllm_shadow_window_optimal_constrained_gap_ratio"]
    assert gap.labels["latency"] == "engine" and gap.value == pytest.approx(last.constrained_gap)
    bound = found["vllm_shadow_window_optimal_constrained_bound_gpu_seconds"].value
    assert bound >= found["vllm_shadow_window_optimal_bound_gpu_seconds"].value
    assert found["vllm_shadow_window_optimal_gap_ratio"].value == pytest.approx(last.optimal_gap)  # kept
    total = found["vllm_shadow_optimal_constrained_bound_gpu_seconds_total"].value
    assert (
        engine.optimal_bound_gpu_seconds
        <= total
        == pytest.approx(engine.optimal_constrained_bound_gpu_seconds)
    )
    assert total <= engine.simulated_gpu_seconds[engine.current] * (1 + SLACK)
    tax = found["vllm_shadow_recompute_gpu_seconds_total"].value
    assert tax == pytest.approx(engine.recompute.gpu_seconds) and 0 < tax < engine.actual_gpu_seconds
    assert found["vllm_shadow_preemptions_total"].value == engine.recompute.preemptions > 0
    assert found["vllm_shadow_recomputed_tokens_total"].value == engine.recompute.recomputed_tokens
    assert found["vllm_shadow_window_recomputed_tokens"].value == last.recompute.recomputed_tokens


def test_each_configuration_s_recomputation_is_exported_beside_the_engine_s(snapshot) -> None:
    """Per configuration, the tokens it would have recomputed; a configuration that never evicts recomputes
    none, and the engine's real figure stands beside them."""
    from prometheus_client.parser import text_string_to_metric_families

    last = snapshot.engines[0].last
    simulated = {
        s.labels["candidate"]: s.value
        for family in text_string_to_metric_families(exposition(snapshot))
        for s in family.samples
        if s.name == "vllm_shadow_window_simulated_recomputed_tokens"
    }
    outcomes = {o.label: o for o in last.outcomes() if not o.error}
    assert simulated == {label: o.recomputed_tokens for label, o in outcomes.items()}
    seconds = {
        s.labels["candidate"]: s.value
        for family in text_string_to_metric_families(exposition(snapshot))
        for s in family.samples
        if s.name == "vllm_shadow_window_simulated_recompute_gpu_seconds"
    }
    assert seconds == {label: o.recompute_gpu_seconds for label, o in outcomes.items()}
    never_evicting = [o for label, o in outcomes.items() if label.startswith("no-eviction")]
    assert never_evicting and all(o.recomputed_tokens == 0 == o.preemptions for o in never_evicting)
    assert all(o.recompute_gpu_seconds == 0 for o in never_evicting)
    windows = support.windows("fcfs-kv6-crowded", 0.5)
    replays = [check_fidelity(w, Slo()).self_replay for w in windows]
    assert sum(r.recomputed_tokens for r in replays) > 0, "the crowded stream's replay preempts"
    # Without prefix caching every recomputed token costs busy time, and never more than the replay's.
    for r in replays:
        assert (r.recompute_gpu_seconds > 0) == (r.recomputed_tokens > 0)
        assert r.recompute_gpu_seconds < r.gpu_seconds


def _text(renderable) -> str:
    console = Console(width=400, record=True)
    console.print(renderable)
    return console.export_text()


def test_status_and_the_demo_summary_show_the_bound_at_equal_latency_first(snapshot) -> None:
    summary = _text(summary_view(snapshot))
    assert summary.index("optimal bound at equal latency") < summary.index(
        "optimal bound with latency ignored"
    )
    preemptions = snapshot.engines[0].recompute.preemptions
    assert f"recompute tax: {preemptions} preemptions" in summary and preemptions > 0
    status = _text(status_view(snapshot))
    assert status.index("optimal bound, at equal latency") < status.index("optimal bound, latency ignored")
    # The window's caption sets the engine's recompute tax beside what the simulated configurations spend.
    last = snapshot.engines[0].last
    caption = recompute_line(last)
    cheapest = min((o for o in last.candidates if not o.error), key=lambda o: o.gpu_seconds)
    assert caption.startswith(f"recompute tax: {last.recompute.preemptions} preemptions")
    assert caption.endswith(
        f"; simulated: {last.fidelity.self_replay.recompute_gpu_seconds:.3f}s under the current configuration, "
        f"{cheapest.recompute_gpu_seconds:.3f}s under the cheapest candidate {cheapest.label}"
    )
    assert (caption in status) == bool(last.recompute.preemptions or last.recompute.gpu_seconds)


def test_shadow_status_reads_the_headline_back_from_the_published_json(snapshot) -> None:
    back = snapshot_from_json(json.loads(json.dumps(to_json(snapshot))))
    engine, original = back.engines[0], snapshot.engines[0]
    assert engine.recompute == original.recompute
    assert engine.optimal_constrained_bound_gpu_seconds == original.optimal_constrained_bound_gpu_seconds
    assert engine.last.constrained.bound_gpu_seconds == original.last.constrained.bound_gpu_seconds
    assert engine.last.constrained.latency == ENGINE_LATENCY
    assert engine.last.constrained_gap == original.last.constrained_gap


def test_the_cli_turns_cp_sat_under_the_deadlines_on() -> None:
    import argparse

    from vllm_shadow.cli.options import add_shadow_options, shadow_config

    parser = argparse.ArgumentParser()
    add_shadow_options(parser)
    default = shadow_config(parser.parse_args([])).evaluation
    assert not default.optimal_constrained_cp_sat
    on = shadow_config(parser.parse_args(["--optimal-constrained-cp-sat"])).evaluation
    assert on.optimal_constrained_cp_sat
    window = support.windows("fcfs-kv12", 0.5)[1]
    task = plan_tasks(window, build_candidates(window.info.scheduler)[:1], on, Slo()).optimal
    assert task is not None and task.kwargs["constrained_cp_sat"] is True
