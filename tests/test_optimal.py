"""The CP-SAT optimum against exhaustive search on tiny windows, and against every heuristic on trace windows.

CP-SAT runs with 2 workers and short limits: every model here is proven optimal in well under a second.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.bruteforce import SearchSpace, exhaustive_optimum
from vllm_shadow.solver.cpsat import build_run_model, runs_from_schedule, schedule_from_runs, solve_run_model
from vllm_shadow.solver.optimal import (
    busy_periods,
    engine_deadlines,
    run_heuristics,
    scaled_deadlines,
    slo_deadlines,
    solve_optimal,
)
from vllm_shadow.solver.problem import EngineLimits, Objective, Window, WindowRequest, parse_objective
from vllm_shadow.solver.schedule import verify

COST = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.0)
GPU = Objective()
E2E = Objective(gpu=0.0, e2e=1.0)
TTFT_MIX = Objective(gpu=1.0, ttft=1.0)
RUN_FORM = {e: SearchSpace(pause=False, chunking=False, max_evictions=e) for e in (0, 1)}
EVERYTHING = {e: SearchSpace(pause=True, chunking=True, max_evictions=e) for e in (0, 1)}
REL = 1e-6  # the model's integer ticks round coefficients down by at most 2% of c per token: far below this


def tiny(kv_blocks: int) -> Window:
    requests = (WindowRequest("a", 0.0, 3, 3), WindowRequest("b", 0.5, 2, 4), WindowRequest("c", 1.0, 4, 2))
    return Window(requests, EngineLimits(kv_blocks=kv_blocks, block_size=2))


def cp_optimum(window, objective, evictions, cost=COST):
    result = solve_optimal(window, cost, objective, max_evictions=evictions, time_limit=10, workers=2)
    assert result.status == "OPTIMAL"
    return result


@pytest.mark.parametrize("kv_blocks", [3, 4, 8])
@pytest.mark.parametrize("objective", [GPU, E2E, TTFT_MIX], ids=str)
@pytest.mark.parametrize("evictions", [0, 1])
def test_cpsat_equals_exhaustive_search_over_the_run_form(kv_blocks, objective, evictions):
    window = tiny(kv_blocks)
    best, _ = exhaustive_optimum(window, COST, objective, RUN_FORM[evictions])
    result = cp_optimum(window, objective, evictions)
    assert result.objective == pytest.approx(best, rel=REL)
    assert result.bound == pytest.approx(best, rel=REL)  # proven: the bound meets the optimum
    assert result.gap < REL


@pytest.mark.parametrize("kv_blocks", [3, 4, 8])
@pytest.mark.parametrize("evictions", [0, 1])
def test_gpu_optimum_of_the_run_form_is_the_optimum_of_every_schedule(kv_blocks, evictions):
    """With d = 0 and no binding budget or cap, pausing and chunked prefill cannot lower GPU cost: the run
    model's optimum equals the exhaustive optimum over every schedule (pauses, chunks, evictions)."""
    window = tiny(kv_blocks)
    best, schedule = exhaustive_optimum(window, COST, GPU, EVERYTHING[evictions])
    assert verify(schedule, window, COST).gpu_seconds == pytest.approx(best)
    result = cp_optimum(window, GPU, evictions)
    assert result.objective == pytest.approx(best, rel=REL)
    assert result.bound_scope.startswith("every schedule")


def test_preemption_pays_off_when_memory_is_tight():
    """The smallest example of INFERMAX's finding: evicting a request frees room that saves batches."""
    window = tiny(3)
    without = cp_optimum(window, GPU, 0)
    with_eviction = cp_optimum(window, GPU, 1)
    assert with_eviction.objective < without.objective - 0.5
    assert with_eviction.summary()["preemptions"] >= 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3), st.floats(0, 2)), min_size=2, max_size=3),
    spare_blocks=st.integers(0, 3),
    evictions=st.integers(0, 1),
)
def test_random_tiny_windows_match_exhaustive_search(shapes, spare_blocks, evictions):
    requests = tuple(WindowRequest(f"r{i}", t, p, o) for i, (p, o, t) in enumerate(shapes))
    most = max(-(-(p + o - 1) // 2) for p, o, _ in shapes)
    window = Window(requests, EngineLimits(kv_blocks=most + spare_blocks, block_size=2))
    best, _ = exhaustive_optimum(window, COST, GPU, EVERYTHING[evictions])
    result = cp_optimum(window, GPU, evictions)
    assert result.objective == pytest.approx(best, rel=REL)


@pytest.mark.parametrize("objective", [GPU, E2E], ids=str)
def test_running_requests_at_the_window_start(objective):
    requests = (
        WindowRequest("decoding", -2.0, 3, 4, computed_tokens=4, generated_tokens=2),
        WindowRequest("prefilling", -1.0, 5, 2, computed_tokens=2),
        WindowRequest("new", 0.5, 2, 3),
    )
    window = Window(requests, EngineLimits(kv_blocks=6, block_size=2), start=0.0)
    for evictions in (0, 1):
        best, _ = exhaustive_optimum(window, COST, objective, RUN_FORM[evictions])
        assert cp_optimum(window, objective, evictions).objective == pytest.approx(best, rel=REL)


def test_an_eviction_limit_only_removes_schedules():
    """Every schedule without preemption is one with at most one: optimum and bound can only go down."""
    window = tiny(3)
    for objective in (GPU, E2E):
        assert cp_optimum(window, objective, 1).bound <= cp_optimum(window, objective, 0).objective + 1e-9


def test_with_d_the_bound_still_holds_for_chunked_prefills():
    """The run form prefills in one batch; with d > 0 chunking a prefill is cheaper in the d term, so the
    bound subtracts the most chunking could save and stays below the optimum over every schedule."""
    cost = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.05)
    window = tiny(4)
    best, _ = exhaustive_optimum(window, cost, GPU, EVERYTHING[0])
    result = solve_optimal(window, cost, GPU, max_evictions=0, time_limit=10, workers=2)
    assert result.bound <= best + 1e-9
    assert result.objective >= best - 1e-9


def test_runs_and_schedules_convert_both_ways():
    window = tiny(3)
    result = cp_optimum(window, GPU, 1)
    runs = runs_from_schedule(window, result.schedule)
    assert schedule_from_runs(window, runs) == result.schedule


def test_model_size_does_not_depend_on_the_horizon_for_gpu_cost():
    """Without latency terms there are no per-batch variables: the model grows with requests, not batches."""
    window = tiny(4)
    small = build_run_model(window, COST, GPU, horizon=10, max_evictions=1)
    large = build_run_model(window, COST, GPU, horizon=1000, max_evictions=1)
    assert small.num_variables == large.num_variables
    assert solve_run_model(large, time_limit=10, workers=2).status == "OPTIMAL"


@pytest.fixture(scope="module")
def trace_window() -> Window:
    """16 Azure code requests, arrivals compressed 20x, on 60 blocks of 16 tokens: memory binds."""
    trace = read_trace(resolve_trace("azure-code"), limit=16, rate_scale=20, max_prompt_tokens=600)
    return Window.from_arrivals(trace.requests, EngineLimits(kv_blocks=60, block_size=16))


@pytest.mark.parametrize("evictions", [0, 1])
def test_optimum_and_bound_against_every_heuristic(trace_window, evictions):
    cost = LinearCostModel(a=0.02, b=2e-4, c=2e-6, d=0.0)
    heuristics = run_heuristics(trace_window, cost, GPU)
    assert all(h.replay.feasible for h in heuristics)
    result = solve_optimal(
        trace_window,
        cost,
        GPU,
        max_evictions=evictions,
        time_limit=6,
        workers=2,
        hints={h.policy: h.schedule for h in heuristics},
    )
    verify(result.schedule, trace_window, cost)
    if evictions == 0:
        assert result.status == "OPTIMAL"
    comparable = [h for h in heuristics if max(h.replay.evictions.values()) <= evictions]
    assert comparable
    for h in comparable:
        assert result.objective <= h.objective + 1e-9, h.policy
        assert result.bound <= h.objective + 1e-9, h.policy
    assert result.relaxation_bound <= result.bound + 1e-9


def test_latency_optimum_found_unseeded_beats_every_heuristic():
    """No hints: CP-SAT must find the schedule itself, and prove it, with the time layer (per-batch
    variables: outputs are capped so that the horizon stays short). It proves it in seconds; the limit is
    generous so that a loaded machine cannot turn the proof into a time-out."""
    trace = read_trace(
        resolve_trace("azure-code"), limit=5, rate_scale=20, max_prompt_tokens=300, max_output_tokens=6
    )
    window = Window.from_arrivals(trace.requests, EngineLimits(kv_blocks=30, block_size=16))
    cost = LinearCostModel(a=0.02, b=2e-4, c=2e-6, d=0.0)
    for objective in (E2E, TTFT_MIX):
        heuristics = run_heuristics(window, cost, objective)
        result = solve_optimal(window, cost, objective, max_evictions=0, time_limit=120, workers=2)
        assert result.status == "OPTIMAL" and result.source == "cp-sat"
        for h in heuristics:
            assert result.bound <= result.objective <= h.objective + 1e-9, (h.policy, str(objective))
        assert result.relaxation_bound <= result.bound


def test_objective_spelling():
    assert parse_objective("gpu") == Objective()
    assert parse_objective("mix:gpu=1,e2e=0.5") == Objective(gpu=1.0, e2e=0.5)
    assert str(parse_objective("mix:e2e=2,ttft=1")) == "mix:e2e=2,ttft=1"
    with pytest.raises(ValueError, match="unknown objective"):
        parse_objective("makespan")
    with pytest.raises(ValueError, match="bad objective term"):
        parse_objective("mix:gpu=1,foo=2")


def test_running_requests_that_only_fit_with_an_eviction():
    """Two running requests whose next tokens do not fit together: without eviction the run form has no
    schedule (one would have to pause), with eviction the optimum drops one and recomputes it."""
    requests = (
        WindowRequest("decoding", -2.0, 3, 4, computed_tokens=4, generated_tokens=2),
        WindowRequest("prefilling", -1.0, 5, 2, computed_tokens=2),
    )
    window = Window(requests, EngineLimits(kv_blocks=5, block_size=2), start=0.0)
    with pytest.raises(ValueError, match="no schedule"):
        solve_optimal(window, COST, GPU, max_evictions=0, time_limit=5, workers=2)
    best, _ = exhaustive_optimum(window, COST, GPU, RUN_FORM[1])
    result = cp_optimum(window, GPU, 1)
    assert result.objective == pytest.approx(best, rel=REL)
    assert result.summary()["preemptions"] == 1


E_COST = LinearCostModel(a=1.0, b=0.1, c=0.01, d=0.0, e=0.05)


@pytest.mark.parametrize("kv_blocks", [3, 4, 8])
@pytest.mark.parametrize("slack", [1.0, 1.6])
def test_cpsat_under_deadlines_equals_exhaustive_search(kv_blocks, slack):
    """Deadlines from vLLM's own schedule (stretched by `slack`): CP-SAT's optimum and bound meet the
    exhaustive optimum over the run form under the same deadlines, with e priced; the schedule meets them
    (checked by the verifier), and no request of it gets its first token or finishes later than allowed."""
    window = tiny(kv_blocks)
    engine = run_heuristics(window, E_COST, GPU, ["vllm"])[0]
    deadlines = scaled_deadlines(engine_deadlines(engine.replay), window, slack)
    best, _ = exhaustive_optimum(window, E_COST, GPU, RUN_FORM[1], deadlines)
    result = solve_optimal(
        window, E_COST, GPU, max_evictions=1, time_limit=10, workers=2, deadlines=deadlines
    )
    assert result.status == "OPTIMAL"
    assert result.objective == pytest.approx(best, rel=REL)
    assert result.bound == pytest.approx(best, rel=REL)
    assert result.objective <= engine.objective + 1e-9
    checked = verify(result.schedule, window, E_COST, deadlines)
    for rid, due in deadlines.finish.items():
        assert checked.finish[rid] <= due + 1e-9
    for rid, due in deadlines.first_token.items():
        assert checked.first_token[rid] <= due + 1e-9
    assert "first token or finish later" in result.bound_scope


def test_deadlines_cost_gpu_time():
    """The unconstrained optimum delays requests; held to vLLM's times it cannot, and pays for it."""
    window = tiny(8)
    engine = run_heuristics(window, E_COST, GPU, ["vllm"])[0]
    free = solve_optimal(window, E_COST, GPU, max_evictions=0, time_limit=10, workers=2)
    held = solve_optimal(
        window,
        E_COST,
        GPU,
        max_evictions=0,
        time_limit=10,
        workers=2,
        deadlines=engine_deadlines(engine.replay),
    )
    assert free.objective < held.objective - 0.5
    assert free.replay.mean_e2e > engine.replay.mean_e2e  # the free optimum serves later than vLLM
    assert held.replay.mean_e2e <= engine.replay.mean_e2e + 1e-9


def test_slo_limits_and_busy_periods():
    """TTFT/TPOT limits become per-request deadlines; requests that must finish before the next arrives form
    separate busy periods, solved apart and summed, and the joined schedule meets every limit."""
    requests = (WindowRequest("a", 0.0, 3, 3), WindowRequest("b", 0.2, 2, 2), WindowRequest("c", 50.0, 4, 3))
    window = Window(requests, EngineLimits(kv_blocks=8, block_size=2))
    deadlines = slo_deadlines(window, ttft=2.0, tpot=1.5)
    assert deadlines.first_token["c"] == pytest.approx(52.0)
    assert deadlines.finish["a"] == pytest.approx(0.0 + 2.0 + 1.5 * 2)
    assert [len(p.requests) for p in busy_periods(window, deadlines)] == [2, 1]
    result = solve_optimal(
        window, E_COST, GPU, max_evictions=0, time_limit=10, workers=2, deadlines=deadlines
    )
    assert result.periods == 2 and result.status == "OPTIMAL"
    best, _ = exhaustive_optimum(window, E_COST, GPU, RUN_FORM[0], deadlines)
    assert result.objective == pytest.approx(best, rel=REL)
    verify(result.schedule, window, E_COST, deadlines)


def test_infeasible_slo_is_reported():
    window = tiny(8)
    with pytest.raises(ValueError, match="no schedule"):
        solve_optimal(
            window,
            E_COST,
            GPU,
            max_evictions=0,
            time_limit=5,
            workers=2,
            deadlines=slo_deadlines(window, 0.1, None),
        )


def test_busy_window_meets_vllm_s_times_and_is_proven_within_one_percent():
    """A busy 64-request conversation window (the engine never idles) under vLLM's own times: the schedule
    returned is verified against every deadline, no request gets its first token or finishes later than under
    vLLM, and the bound (the time-capacity LP, valid for every schedule meeting the times) is within 1%."""
    from vllm_shadow.cli.optimal import roofline_without_attention_term
    from vllm_shadow.costmodel.architecture import load_model
    from vllm_shadow.costmodel.hardware import get_hardware

    cost = roofline_without_attention_term(load_model("llama-2-7b"), get_hardware("a100"), 1)
    trace = read_trace(resolve_trace("azure-conv"), start=1200, limit=64)
    window = Window.from_arrivals(trace.requests, EngineLimits(kv_blocks=7383, block_size=16))
    heuristics = run_heuristics(window, cost, GPU, ["vllm", "sarathi"])
    engine = heuristics[0].replay
    deadlines = engine_deadlines(engine)
    result = solve_optimal(
        window,
        cost,
        GPU,
        time_limit=60,
        hints={h.policy: h.schedule for h in heuristics},
        deadlines=deadlines,
    )
    checked = verify(result.schedule, window, cost, deadlines)
    assert all(checked.first_token[rid] <= engine.first_token[rid] + 1e-9 for rid in engine.first_token)
    assert all(checked.finish[rid] <= engine.finish[rid] + 1e-9 for rid in engine.finish)
    assert result.gap <= 0.01 and result.bound <= result.objective <= heuristics[0].objective + 1e-9
    assert result.bound_method == "time-capacity relaxation"
