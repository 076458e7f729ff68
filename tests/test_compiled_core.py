"""The compiled simulator core (solver/simulator.py built by Cython, see setup.py) against the plain-Python one.

Both run the same source; the property tests hold them to the same result on random workloads, for every preset,
prefix caching on and off, async scheduling on and off, initial running requests and both arrival clocks: every
step record, every request record, the busy time and the aggregates, equal to the last bit.

The compiled core must be built (`pip install -e .` builds it). Only where the build was skipped on purpose
(VLLM_SHADOW_SKIP_COMPILE=1, a machine without a C compiler) do these tests skip instead of failing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.compiled_support import current_build
from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver import simulator
from vllm_shadow.solver.policies import PRESETS, Policy, parse_policy
from vllm_shadow.solver.records import RequestRecord, RunningRequest, SimResult

COST = LinearCostModel(a=0.004, b=3e-5, c=2e-7, d=1e-9, e=1.5e-4)


def cores() -> tuple[ModuleType, ModuleType]:
    """(compiled, pure); skips only where the build was skipped on purpose, fails anywhere else."""
    compiled = current_build(
        simulator.compiled_core(), simulator.COMPILED_MODULE, "simulator core", simulator.stale_sources
    )
    return compiled, simulator.pure_core()


def _number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def view(result: SimResult) -> dict:
    """Everything a simulation returns, NaN spelled None so that an unset time compares equal."""
    return {
        "policy": result.policy,
        "gpu_seconds": result.gpu_seconds,
        "recompute_gpu_seconds": result.recompute_gpu_seconds,
        "demands": result.demands,
        "num_steps": result.num_steps,
        "peak_kv_blocks": result.peak_kv_blocks,
        "tokens_processed": result.tokens_processed,
        "requests": [tuple(_number(v) for v in dataclasses.astuple(r)) for r in result.requests],
        "steps": None if result.steps is None else [dataclasses.astuple(s) for s in result.steps],
    }


@st.composite
def policies(draw) -> Policy:
    """Any preset with random knobs; prefix caching only where the preset evicts, async only where it batches
    continuously (what Policy accepts)."""
    base = PRESETS[draw(st.sampled_from(sorted(PRESETS)))]
    knobs = {
        "max_num_seqs": draw(st.integers(1, 12)),
        "max_num_batched_tokens": draw(st.integers(8, 96)),
        "long_prefill_token_threshold": draw(st.sampled_from([0, 0, 5, 17])),
        "order": draw(st.sampled_from(["fcfs", "fcfs", "priority", "prompt", "output"])),
        "chunked_prefill": draw(st.sampled_from([base.chunked_prefill, not base.chunked_prefill])),
        "watermark": draw(st.sampled_from([base.watermark, 0.0, 0.05])),
        "victim": draw(st.sampled_from(["newest", "newest", "least-computed"])),
    }
    if base.eviction:
        knobs["enable_prefix_caching"] = draw(st.booleans())
    if base.batching == "continuous":
        knobs["async_scheduling"] = draw(st.booleans())
    return dataclasses.replace(base, **knobs)


@st.composite
def workloads(draw):
    """Requests with bursty arrivals, priorities, and prompts from a few families sharing leading blocks (chained
    hashes stay consistent: a shared prefix, then the request's own blocks); some already running at the start."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 25))
    requests, t, longest = [], 0.0, 0
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.0, 0.01, 0.3, 2.0]))
        prompt, output = draw(st.integers(1, 60)), draw(st.integers(1, 40))
        longest = max(longest, prompt + output - 1)
        family, num_full = draw(st.integers(0, 3)), prompt // block_size
        num_shared = draw(st.integers(0, num_full))
        hashes = tuple(family * 1000 + j for j in range(num_shared)) + tuple(
            -(i * 1000 + j) - 1 for j in range(num_shared, num_full)
        )
        requests.append(
            RequestArrival(f"r{i}", t, prompt, output, priority=draw(st.integers(0, 2)), block_hashes=hashes)
        )
    blocks = math.ceil(longest / block_size) + 1 + draw(st.integers(0, 20))
    num_initial = draw(st.integers(0, min(2, n - 1)))
    initial = []
    for request in requests[:num_initial]:
        # A decoder that fits: its prompt computed and some tokens generated.
        generated = draw(st.integers(1, request.output_tokens - 1)) if request.output_tokens > 1 else 0
        if generated:
            computed = request.prompt_tokens + generated - 1
            initial.append(simulator.RunningRequest(request, computed, generated))
    if sum(math.ceil(r.computed_tokens / block_size) for r in initial) > blocks - 1:
        initial = []
    carried = {state.request.request_id for state in initial}
    return [r for r in requests if r.request_id not in carried], initial, block_size, blocks


def run_both(requests, policy, *, initial=(), arrival_steps=None, **kw) -> tuple[dict, dict]:
    compiled, pure = cores()

    def outcome(core):
        try:
            return view(
                core.simulate(
                    requests,
                    policy,
                    COST,
                    initial_running=initial,
                    arrival_steps=arrival_steps,
                    start_time=0.0 if initial else None,
                    **kw,
                )
            )
        except (ValueError, RuntimeError) as exc:  # an initial state the policy cannot take over, or a policy
            return {"refused": str(exc)}  # that thrashes: both cores must refuse it alike

    return outcome(compiled), outcome(pure)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.booleans(), st.booleans())
def test_compiled_core_equals_pure_python(workload, policy, record_steps, fast_forward):
    requests, initial, block_size, blocks = workload
    compiled, pure = run_both(
        requests,
        policy,
        initial=initial,
        num_kv_blocks=blocks,
        block_size=block_size,
        record_steps=record_steps,
        fast_forward=fast_forward,
    )
    assert compiled == pure
    if "refused" in compiled:  # only a no-eviction policy refuses a state, and only one it did not reach
        assert not parse_policy(policy).eviction and initial, compiled
    else:
        assert len(compiled["requests"]) == len(requests) + len(initial)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies())
def test_compiled_core_equals_pure_python_in_step_space(workload, policy):
    """The fidelity replay's clock: each request enters the queue at an engine step count."""
    requests, _initial, block_size, blocks = workload
    arrival_steps = {r.request_id: int(r.time * 3) for r in requests}
    compiled, pure = run_both(
        requests,
        policy,
        arrival_steps=arrival_steps,
        num_kv_blocks=blocks,
        block_size=block_size,
        record_steps=True,
    )
    assert compiled == pure


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), policies(), st.integers(0, 60), st.booleans())
def test_a_run_cut_short_has_the_whole_run_s_first_steps(workload, policy, max_steps, step_space):
    """`max_steps` (the fidelity check's replay stops at the window's last step): the steps are the first
    `max_steps` of the run to the end, in both cores, in time and in step space, fast paths included."""
    requests, initial, block_size, blocks = workload
    arrival_steps = {r.request_id: int(r.time * 3) for r in requests} if step_space else None
    for core in cores():
        run = functools.partial(
            core.simulate,
            requests,
            policy,
            COST,
            num_kv_blocks=blocks,
            block_size=block_size,
            initial_running=() if step_space else initial,
            start_time=0.0 if initial and not step_space else None,
            arrival_steps=arrival_steps,
            record_steps=True,
        )
        try:
            whole = run()
        except (ValueError, RuntimeError):  # refused or thrashing: nothing to cut
            continue
        cut = run(max_steps=max_steps)
        assert cut.steps == whole.steps[:max_steps]
        assert cut.num_steps == min(max_steps, whole.num_steps)


def test_both_cores_refuse_bad_input_alike():
    compiled, pure = cores()
    too_long = [RequestArrival("big", 0.0, 100, 10)]
    for core in (compiled, pure):
        with pytest.raises(ValueError, match="big: 100\\+10 tokens can never fit in 3 KV blocks"):
            core.simulate(too_long, "vllm", COST, num_kv_blocks=4, block_size=4)
        with pytest.raises(ValueError, match="unknown policy"):
            core.simulate([], "nope", COST, num_kv_blocks=4, block_size=4)
        # One id twice, among the arrivals or a carried request's arriving again (with its last token in flight
        # too: its blocks are freed before the arrivals are read).
        twice = [
            RequestArrival("a", 0.0, 4, 2),
            RequestArrival("b", 0.0, 4, 2),
            RequestArrival("a", 1.0, 4, 2),
        ]
        with pytest.raises(ValueError, match="request id 'a' is given more than once"):
            core.simulate(twice, "vllm", COST, num_kv_blocks=16, block_size=4)
        for carried in (RunningRequest(twice[1], 4, 1), RunningRequest(twice[1], 5, 2, True)):
            with pytest.raises(ValueError, match="request id 'b' is given more than once"):
                core.simulate(
                    twice[:2], "vllm", COST, num_kv_blocks=16, block_size=4, initial_running=[carried]
                )


def test_engine_time_past_64_bits_falls_back_to_the_pure_core():
    """The compiled core keeps picoseconds in 64-bit integers: a replay whose clock passes 2**63 ps (steps of a
    million seconds here) makes it raise OverflowError, never wrap, and `simulate` answers with the pure core."""
    compiled, pure = cores()
    slow = LinearCostModel(a=1e6, b=0.0, c=0.0, d=0.0)
    requests = [RequestArrival(f"r{i}", 0.0, 8, 4) for i in range(4)]
    kw = {"num_kv_blocks": 64, "block_size": 4, "record_steps": True}
    with pytest.raises(OverflowError):
        compiled.simulate(requests, "vllm(max_num_seqs=1)", slow, **kw)
    expected = pure.simulate(requests, "vllm(max_num_seqs=1)", slow, **kw)
    assert expected.gpu_seconds > 2**63 / 1e12
    assert view(simulator.simulate(requests, "vllm(max_num_seqs=1)", slow, **kw)) == view(expected)
    # Below 2**63 ps the compiled core answers alone, to the same digit.
    fast = LinearCostModel(a=1e5, b=0.0, c=0.0, d=0.0)
    assert view(compiled.simulate(requests, "vllm(max_num_seqs=1)", fast, **kw)) == view(
        pure.simulate(requests, "vllm(max_num_seqs=1)", fast, **kw)
    )


def test_a_real_trace_slice_replays_identically():
    """A thousand requests of the bundled Azure trace on an A100-sized cache: long decode stretches, thousands
    of steps, the fast paths and the closed-form sums at scale."""
    from vllm_shadow.adapters.traces import read_trace, resolve_trace

    requests = read_trace(resolve_trace("azure-conv"), limit=1000).requests
    for policy in ("vllm(max_num_seqs=128,max_num_batched_tokens=4096)", "sarathi", parse_policy("lightllm")):
        compiled, pure = run_both(requests, policy, num_kv_blocks=2000, block_size=16)
        assert compiled == pure
        assert compiled["num_steps"] > 1000


def _core_in_a_fresh_interpreter(pure_python: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SHADOW_PURE_PYTHON"}
    if pure_python is not None:
        env["VLLM_SHADOW_PURE_PYTHON"] = pure_python
    code = (
        "from vllm_shadow.solver import simulator as s; "
        "print(s.COMPILED, s.simulate.__module__, s.Simulator.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_environment_selects_the_core():
    cores()  # skips or fails where the compiled core is absent
    assert _core_in_a_fresh_interpreter(None) == (
        f"True {simulator.COMPILED_MODULE} {simulator.COMPILED_MODULE}"
    )
    # The fallback truly runs the .py source: the module's own classes, not the build's.
    pure = "False vllm_shadow.solver.simulator vllm_shadow.solver.simulator"
    assert _core_in_a_fresh_interpreter("1") == pure
    assert _core_in_a_fresh_interpreter("0").startswith("True ")


def test_a_stale_or_missing_build_falls_back_with_a_warning(tmp_path, monkeypatch):
    """solver.compiled_build, which both the core and the prefix cache load their builds through: a build older
    than its .py or .pxd is not used (with a warning naming the edited file), a missing one is None, a build
    that fails to import for another reason is an error, and VLLM_SHADOW_PURE_PYTHON turns any build off."""
    from vllm_shadow.solver import compiled_build

    compiled, _pure = cores()
    source, declarations = tmp_path / "simulator.py", tmp_path / "_simulator_compiled.pxd"
    source.write_text("")
    declarations.write_text("")
    built = os.stat(compiled.__file__).st_mtime
    os.utime(source, (built - 10, built - 10))
    os.utime(declarations, (built - 10, built - 10))
    monkeypatch.delenv("VLLM_SHADOW_PURE_PYTHON", raising=False)
    args = (simulator.COMPILED_MODULE, source, declarations, "simulator core", "core")
    assert compiled_build.build_in_use(*args) is compiled
    os.utime(declarations, (built + 10, built + 10))
    with pytest.warns(UserWarning, match="older than _simulator_compiled.pxd: running the plain-Python core"):
        assert compiled_build.build_in_use(*args) is None
    monkeypatch.setenv("VLLM_SHADOW_PURE_PYTHON", "1")
    os.utime(declarations, (built - 10, built - 10))
    assert compiled_build.build_in_use(*args) is None
    assert compiled_build.compiled_module("vllm_shadow.solver._no_such_build") is None
    with pytest.raises(ModuleNotFoundError):  # another module missing than the build itself: an error
        compiled_build.compiled_module("vllm_shadow.solver._no_such_package.build")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), max_size=200), st.data())
def test_the_peak_check_s_sort_sorts_a_prefix_in_place(values, data):
    # The heapsort that the compiled core sorts LightLLM's jobs with (C integers), in both cores; the plain core's
    # own check sorts with list.sort.
    n = data.draw(st.integers(0, len(values)))
    for core in cores():
        array = core._zeros(len(values))
        array[:] = core.array("q", values)
        core._sort_ascending(array, n)
        assert list(array) == sorted(values[:n]) + values[n:]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=60, unique=True), st.data())
def test_a_finished_request_leaves_the_running_queue_alike_in_both_cores(seqs, data):
    # In running_seq order (found by bisection) or out of it (found by the scan): only that request leaves.
    order = sorted(seqs) if data.draw(st.booleans()) else seqs
    leaving = data.draw(st.integers(0, len(seqs) - 1))
    for core in cores():
        requests = []
        for seq in order:
            request = core._Request(f"r{seq}", 0, 1, 1, None, None)
            request.running_seq = seq
            requests.append(request)
        expected = requests[:leaving] + requests[leaving + 1 :]
        core._remove_in_seq_order(requests, requests[leaving])
        assert requests == expected


def test_a_record_built_in_c_is_the_dataclass_s_own():
    # The compiled core sets a record's slots from C (simulator._new_record), not through its __init__.
    for core in cores():
        record = core._new_record("r7", 1.25, 3, 4, 2)
        assert type(record) is RequestRecord
        expected = RequestRecord("r7", 1.25, 3, 4, 2)
        assert [_number(v) for v in dataclasses.astuple(record)] == [
            _number(v) for v in dataclasses.astuple(expected)
        ]
        assert dataclasses.replace(record, finish=2.0).finish == 2.0
        assert dataclasses.asdict(record)["num_cached_tokens"] == 0
        record.preemptions += 1
        assert record.preemptions == 1 and math.isnan(record.first_token)


@dataclasses.dataclass
class _OtherArrival:
    """Not a RequestArrival: the compiled core reads such an arrival's fields by name, not off its slots."""

    request_id: str
    time: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    block_hashes: tuple[int, ...] = ()


def test_an_arrival_of_another_class_replays_alike():
    requests = [
        RequestArrival(
            f"r{i}", 0.1 * (i // 2), 5 + 7 * i, 1 + 3 * i, priority=i % 3, block_hashes=(i % 2, -i)
        )
        for i in range(12)
    ]
    others = [
        _OtherArrival(**{f.name: getattr(r, f.name) for f in dataclasses.fields(_OtherArrival)})
        for r in requests
    ]
    for policy in (
        "vllm(max_num_seqs=4,max_num_batched_tokens=32,enable_prefix_caching=true)",
        "sjf",
        "lightllm",
    ):
        compiled, pure = run_both(requests, policy, num_kv_blocks=40, block_size=4, record_steps=True)
        assert compiled == pure
        assert run_both(others, policy, num_kv_blocks=40, block_size=4, record_steps=True) == (compiled, pure)


@dataclasses.dataclass
class _OtherRunning:
    """Not a RunningRequest: the compiled core reads such a carried request's fields by name, not off its slots."""

    request: RequestArrival
    computed_tokens: int
    generated_tokens: int
    finishing: bool = False
    decoded_in_flight: bool = False


def test_carried_requests_are_read_alike_off_the_one_shared_class():
    # The compiled core reads a carried request off RunningRequest's slots, where its class is the one the engine
    # tracker builds (records.py's, not a class of each core's own): otherwise each read falls back to a lookup.
    compiled, pure = cores()
    assert compiled.RunningRequest is pure.RunningRequest is simulator.RunningRequest is RunningRequest
    arrivals = [RequestArrival(f"r{i}", 0.05 * i, 6 + 5 * i, 3 + 2 * i, priority=i % 2) for i in range(8)]
    carried = [
        RunningRequest(arrivals[0], 6, 1),
        RunningRequest(arrivals[1], 12, 2, decoded_in_flight=True),
        RunningRequest(arrivals[2], 16, 4, finishing=True),
    ]
    others = [_OtherRunning(**dataclasses.asdict(r) | {"request": r.request}) for r in carried]
    for policy in ("vllm(max_num_seqs=3,async_scheduling=true)", "sjf", "lightllm"):
        outcomes = run_both(
            arrivals[3:], policy, initial=carried, num_kv_blocks=30, block_size=4, record_steps=True
        )
        assert outcomes[0] == outcomes[1]
        assert run_both(
            arrivals[3:], policy, initial=others, num_kv_blocks=30, block_size=4, record_steps=True
        ) == (outcomes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(1, 4), st.sampled_from([0.0, 0.0, 0.5])),
        min_size=1,
        max_size=200,
    ),
    st.sampled_from(["priority", "prompt", "output"]),
    st.sampled_from(["vllm", "sarathi", "orca", "vllm(async_scheduling=true)"]),
)
def test_ordered_waiting_queues_serve_alike_in_both_cores(draws, order, preset):
    # Long waiting queues under an order key, most keys tied but for the arrival or the index: the compiled
    # core's heap of requests on C fields against heapq's over the key tuples.
    requests, t = [], 0.0
    for i, (priority, prompt, output, gap) in enumerate(draws):
        t += gap
        requests.append(RequestArrival(f"r{i}", t, prompt, output, priority=priority))
    policy = dataclasses.replace(parse_policy(preset), order=order, max_num_seqs=3, max_num_batched_tokens=8)
    compiled, pure = run_both(requests, policy, num_kv_blocks=12, block_size=2, record_steps=True)
    assert compiled == pure
    assert "refused" not in compiled
