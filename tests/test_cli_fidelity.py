"""`shadow fidelity`: the operator's check that the simulator reproduces their engine, from a recording."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vllm_shadow.adapters.events import EngineStep, RequestArrival, RequestFinish
from vllm_shadow.adapters.recorder import Recorder, read_events
from vllm_shadow.cli.main import main

RECORDINGS = sorted((Path(__file__).parent / "data" / "shadow").glob("*.jsonl.gz"))


def fidelity(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["fidelity", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def write(path: Path, events: list) -> Path:
    recorder = Recorder(path)
    recorder.write(events)
    recorder.close()
    return path


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.name)
def test_recordings_of_real_engines_replay_identically(recording: Path, capsys) -> None:
    code, report = fidelity(capsys, str(recording))
    assert code == 0
    assert report["steps_compared"] == report["steps_identical"] > 400
    assert report["first_divergence"] is None and report["diverging_steps"] == 0
    assert report["requests_finished"] == report["requests"]


def test_a_step_the_simulator_would_not_take_is_the_first_divergence(tmp_path: Path, capsys) -> None:
    events = list(read_events(RECORDINGS[0]))
    steps = [i for i, e in enumerate(events) if isinstance(e, EngineStep) and len(e.scheduled_tokens) > 1]
    target = steps[len(steps) // 2]
    step = events[target]
    victim = sorted(step.scheduled_tokens)[0]
    tokens = dict(step.scheduled_tokens)
    tokens[victim] += 1  # the engine "computed" one token more than vLLM's policy allows there
    events[target] = dataclasses.replace(step, scheduled_tokens=tokens)
    code, report = fidelity(capsys, str(write(tmp_path / "tampered.jsonl", events)))
    assert code == 1
    first = report["first_divergence"]
    non_empty_before = sum(1 for e in events[:target] if isinstance(e, EngineStep) and e.scheduled_tokens)
    assert first["step"] == non_empty_before and first["engine_step"] == step.step
    assert first["what"] == ["tokens"] and first["requests"] == [victim]
    assert first["engine"]["scheduled_tokens"][victim] == first["simulator"]["scheduled_tokens"][victim] + 1
    assert report["steps_identical"] < report["steps_compared"]


def test_a_recording_without_steps_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    # What the stat-logger plugin records: arrivals and finishes, no steps.
    events = [e for e in read_events(RECORDINGS[0]) if not isinstance(e, EngineStep)]
    assert any(isinstance(e, RequestArrival) for e in events) and any(
        isinstance(e, RequestFinish) for e in events
    )
    path = write(tmp_path / "no-steps.jsonl", events)
    assert main(["fidelity", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "no engine steps" in err and "MirrorScheduler" in err


def test_bad_files_are_errors_naming_the_file(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    assert main(["fidelity", str(garbage)]) == 2
    assert str(garbage) in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main(["fidelity", str(missing)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_a_prefix_caching_engine_replays_only_with_its_cache_modelled() -> None:
    # Recorded with vLLM's default prefix caching under KV pressure: resumed requests re-hit their own blocks.
    # The self replay models the cache (and matches every step); without it the replay diverges.
    from vllm_shadow.evaluation.candidates import current_policy
    from vllm_shadow.evaluation.recorded_run import STEP_SPACE_COST, MirroredRun, check_run
    from vllm_shadow.evaluation.step_match import compare_steps
    from vllm_shadow.solver.simulator import simulate

    run = MirroredRun.from_events(
        read_events(Path(__file__).parent / "data" / "shadow" / "fcfs-kv16-prefix-caching.jsonl.gz")
    )
    assert run.info is not None and run.info.scheduler.enable_prefix_caching
    assert sum(len(s.preempted) for s in run.steps) > 0
    comparison = check_run(run)
    assert comparison.matched == comparison.real_steps == comparison.simulated_steps
    without_cache = dataclasses.replace(current_policy(run.info.scheduler), enable_prefix_caching=False)
    replay = simulate(
        run.finished_requests,
        without_cache,
        STEP_SPACE_COST,
        num_kv_blocks=run.info.num_kv_blocks,
        block_size=run.info.block_size,
        record_steps=True,
        arrival_steps=run.arrival_steps,
    )
    assert compare_steps(run.steps, replay.steps or []).mismatches
