"""Live windows under prefix caching: each starts with what the engine's cache held, and replays step for step.

A request admitted in a window may hit blocks that requests of earlier windows left cached, and a preempted
request resumes from its own surviving blocks; the tracker follows the engine's cache from its steps
(`vllm_shadow.tracking.prefix_cache`) and hands each window the cache's free queue at its start.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from tests import shadow_support as support
from vllm_shadow.adapters.events import (
    EngineInfo,
    EngineStep,
    RequestArrival,
    RequestFinish,
    SchedulerSettings,
)
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.evaluation.evaluate import Slo, check_fidelity
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.windows import WindowRules

RECORDING = "fcfs-kv16-prefix-caching"  # a real CPU engine, prefix caching on, under KV pressure


@pytest.mark.parametrize("seconds", [0.25, 1.0])
def test_windows_of_a_real_engine_with_prefix_caching_replay_it_step_for_step(seconds: float) -> None:
    windows = support.windows(RECORDING, seconds)
    assert len(windows) >= 10 and windows[0].info.scheduler.enable_prefix_caching
    for window in windows:
        fidelity = check_fidelity(window, Slo())
        assert fidelity.steps_matched == fidelity.steps_compared == len(window.steps), fidelity.first_mismatch
    # The start state decides steps: without the cached blocks nobody held at its start, some window's replay
    # diverges from the engine.
    bare = [dataclasses.replace(w, free_queue=()) for w in windows if w.free_queue]
    assert any((f := check_fidelity(w, Slo())).steps_matched < f.steps_compared for w in bare), (
        "the recording was meant to need the cache's contents at some window start"
    )


def _tracker(info: EngineInfo, rules: WindowRules) -> EngineTracker:
    return EngineTracker(info, rules=rules, prior=engine_prior(info, "cpu")[0], clock=time.monotonic)


def test_a_resumed_request_that_finds_its_kv_cached_computes_and_recomputes_none_of_it() -> None:
    # 16-token blocks, 11 usable. "s" (100-token prompt, 7 blocks) and "r" (60 tokens: 3 hashed blocks and a
    # 4th it fills with its first emitted tokens) run until "r" needs a 5th block: "r", the running queue's
    # tail, preempts itself. Its blocks stay cached and free; when "s" is gone, "r" resumes with 64 of its 65
    # tokens found in the cache (the hook says so: cached_tokens) and computes only the last one. Without the
    # hit, the tracker would count 64 recomputed tokens and miss "r"'s emitted tokens.
    settings = SchedulerSettings(max_num_seqs=2, max_num_batched_tokens=256, enable_prefix_caching=True)
    tracker = _tracker(EngineInfo("m", 16, 12, settings), WindowRules(seconds=100.0))

    def step(n: int, scheduled: dict[str, int], used: int, **fields: object) -> EngineStep:
        return EngineStep(n, n * 0.01, 0.01, scheduled, kv_blocks_used=used, **fields)  # type: ignore[arg-type]

    events = [
        RequestArrival("s", 0.0, 100, max_tokens=7, block_hashes=(21, 22, 23, 24, 25, 26)),
        RequestArrival("r", 0.0, 60, max_tokens=7, block_hashes=(11, 12, 13)),
        step(0, {"s": 100, "r": 60}, 11),
        *(step(n, {"s": 1, "r": 1}, 11) for n in range(1, 5)),
        step(5, {"s": 1}, 7, preempted=("r",)),
        step(6, {"s": 1}, 7, finished=("s",)),
        RequestFinish("s", 0.07, 7),
        step(7, {"r": 1}, 5, cached_tokens={"r": 64}),
        step(8, {"r": 1}, 5, finished=("r",)),
        RequestFinish("r", 0.09, 7),
    ]
    for event in events:
        tracker.apply(event)
    tracker.flush()
    (window,) = tracker.take_ready()
    assert window.recompute.preemptions == 1 and window.recompute.recomputed_tokens == 0
    assert tracker.stats.inconsistencies == 0  # "r" emitted the 7 tokens the engine reported
    assert tracker.prefix_cache_mismatches == 0  # the tracker's cache found the same hit and block counts
    fidelity = check_fidelity(window, Slo())
    assert fidelity.steps_matched == fidelity.steps_compared == 9, fidelity.first_mismatch
    assert (
        fidelity.self_replay.prefix_cache_hits == 0
    )  # a resume's hit is no first admission's (vLLM's count)


def test_a_stream_the_cache_model_cannot_follow_is_counted_never_raised() -> None:
    # Steps that hold more blocks than the engine has (a sender's bug, or events the model misread): the
    # tracker keeps going, takes the engine's own count of blocks in use, and counts the mismatch.
    settings = SchedulerSettings(max_num_seqs=4, max_num_batched_tokens=512, enable_prefix_caching=True)
    tracker = _tracker(EngineInfo("m", 16, 4, settings), WindowRules(seconds=100.0))
    tracker.apply(RequestArrival("a", 0.0, 200, max_tokens=2, block_hashes=tuple(range(12))))
    tracker.apply(RequestArrival("b", 0.0, 100, max_tokens=2, block_hashes=tuple(range(100, 106))))
    tracker.apply(EngineStep(0, 0.0, 0.01, {"a": 200, "b": 100}, kv_blocks_used=3))
    tracker.apply(EngineStep(1, 0.01, 0.01, {"a": 1, "b": 1}, kv_blocks_used=3, finished=("a", "b")))
    assert tracker.prefix_cache_mismatches >= 1 and tracker.stats.requests_finished == 2


@pytest.mark.integration
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_vllm_s_scheduler_with_shared_prompts_windows_replay_with_the_hits_the_hook_publishes(
    async_scheduling: bool,
) -> None:
    # vLLM's own Scheduler in-process (as tests/test_fidelity_scale.py drives it), requests sharing system
    # prompts, KV short enough to preempt: the hook publishes each admission's hit exactly as vLLM decided it,
    # and every window replays the engine step for step from its start state. Under async scheduling (vLLM's
    # AsyncScheduler) a finished request's blocks are freed one schedule later.
    pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
    from benchmarks.fidelity_scale import ScaleConfig, drive, load_workload

    config = ScaleConfig(
        "shared-prompt",
        300,
        64,
        2048,
        enable_prefix_caching=True,
        async_scheduling=async_scheduling,
        requests_per_step=0.5,
        limit=48,
    )
    decided, events = drive(config, load_workload(config))
    assert any(d.preempted for d in decided) and sum(bool(d.cached_tokens) for d in decided) > 10
    _windows_replay_step_for_step(decided, events)


@pytest.mark.integration
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_chat_turns_that_send_back_the_engine_s_replies_hit_them_in_window_replays(
    async_scheduling: bool,
) -> None:
    # Conversations whose every turn sends back the whole history, the engine's own replies included (vLLM's
    # Scheduler in-process, KV short enough to preempt). A turn hits the blocks its previous turn's output
    # filled: vLLM caches them under hashes the hook publishes at the finish (`RequestFinish.block_hashes`).
    # Windows replay step for step only if the tracker's cache model and the window replays cache them too.
    # Under async scheduling some window starts fall where a finished request is not freed yet, or where a
    # victim's last block would have no hash: cuts at three window lengths, on a clock of steps (the hook's is
    # the wall clock, which would move the cuts from run to run).
    pytest.importorskip("vllm", reason="the CPU build of vLLM is installed by `make test`")
    from benchmarks.fidelity_scale import ScaleConfig, drive, load_workload

    config = ScaleConfig(
        "chat",
        500,
        64,
        2048,
        enable_prefix_caching=True,
        async_scheduling=async_scheduling,
        requests_per_step=0.3,
        limit=96,
    )
    workload = load_workload(config)
    decided, events = drive(config, workload)
    index = {r: i for i, r in enumerate(workload.request_ids)}
    assert workload.after is not None
    hits_on_replies = [
        request_id
        for d in decided
        for request_id, hit in d.cached_tokens.items()
        if (parent := workload.after[index[request_id]]) is not None and hit > workload.prompt_lengths[parent]
    ]
    assert len(hits_on_replies) >= 5 and any(d.preempted for d in decided)
    events = _on_a_step_clock(events)
    windows = [w for per_run in (7, 16, 29) for w in _windows_replay_step_for_step(decided, events, per_run)]
    if async_scheduling:
        assert sum(r.finishing for w in windows for r in w.running) >= 1


def _on_a_step_clock(events: list) -> list:
    """The stream with every step 10 ms long and every other event timed at the next step's start."""
    clock, timed = 0.0, []
    for event in events:
        if isinstance(event, EngineStep):
            timed.append(dataclasses.replace(event, start_time=clock, duration=0.01))
            clock += 0.01
        elif isinstance(event, (RequestArrival, RequestFinish)):
            timed.append(dataclasses.replace(event, time=clock))
        else:
            timed.append(event)
    return timed


def _windows_replay_step_for_step(decided: list, events: list, windows_per_run: int = 8) -> list:
    steps = [e for e in events if isinstance(e, EngineStep) and e.scheduled_tokens]
    assert [s.cached_tokens for s in steps] == [d.cached_tokens for d in decided]
    info = events[0]
    assert isinstance(info, EngineInfo)
    span = steps[-1].start_time + steps[-1].duration - steps[0].start_time
    # Windows over the whole run, finishes included.
    tracker = _tracker(info, WindowRules(seconds=span / windows_per_run))
    for event in events[1:]:
        tracker.apply(event)
    tracker.flush()
    windows = tracker.take_ready()
    assert len(windows) >= 5 and tracker.prefix_cache_mismatches == 0
    for window in windows:
        fidelity = check_fidelity(window, Slo())
        assert fidelity.steps_matched == fidelity.steps_compared, fidelity.first_mismatch
    assert sum(len(w.free_queue) > 0 for w in windows) >= 2
    return windows


@pytest.mark.parametrize("decoded_in_flight", [False, True])
def test_a_window_start_says_which_decoder_s_last_block_async_scheduling_left_unhashed(
    decoded_in_flight: bool,
) -> None:
    # Async scheduling: vLLM caches a decoder's newest block only when the output of the step that sampled its
    # token is processed, and never a victim's (AsyncScheduler; tests/test_fidelity_scale.py holds the simulator
    # to it). "b" (47-token prompt, 2 tokens out, 48 computed: 3 full blocks) is preempted at the window's first
    # step, where "a" takes the last free block. If it decoded in the step before the start the token sampled
    # the step before that (`decoded_in_flight`), its third block has no hash and its resume finds 32 tokens
    # cached, else 48.
    from vllm_shadow.costmodel.linear import LinearCostModel
    from vllm_shadow.solver.simulator import RunningRequest, simulate

    policy = "vllm(max_num_seqs=2,max_num_batched_tokens=64,enable_prefix_caching=true,async_scheduling=true)"
    running = [
        RunningRequest(
            RequestArrival(name, 0.0, 47, 6, block_hashes=hashes), 48, 2, decoded_in_flight=decoded_in_flight
        )
        for name, hashes in (("a", (1, 2)), ("b", (3, 4)))
    ]
    result = simulate(
        [], policy, LinearCostModel(a=1e-3, b=0.0, c=0.0, d=0.0), num_kv_blocks=8, block_size=16,
        initial_running=running, start_time=0.0, record_steps=True,
    )  # fmt: skip
    assert result.steps is not None and result.steps[0].preempted == ("b",)
    (resumed,) = [s for s in result.steps if "b" in s.cached_tokens]
    assert resumed.cached_tokens["b"] == (32 if decoded_in_flight else 48)
