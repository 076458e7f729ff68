"""The pure parts of benchmarks/replay_speed.py and benchmarks/vidur_driver.py: the work handed to Vidur, the
profile files it is served, and the table. Nothing here installs or runs Vidur."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

from vllm_shadow.adapters.events import RequestArrival

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


bench = _load("replay_speed")
driver = _load("vidur_driver")


def test_requests_are_clipped_as_vidurs_trace_reader_clips_them():
    requests = [
        RequestArrival("fits", 0.0, 4000, 96),
        RequestArrival("long", 0.5, 4000, 200),
        RequestArrival("no-output", 1.0, 10, 0),
    ]
    clipped = bench.clip_like_vidur(requests, 4096)
    assert clipped[0] is requests[0]
    # Vidur shortens the prompt, never the output, down to prompt + output = max_tokens.
    assert (clipped[1].prompt_tokens, clipped[1].output_tokens) == (3896, 200)
    assert (clipped[2].prompt_tokens, clipped[2].output_tokens) == (10, 1)
    assert [r.request_id for r in clipped] == ["fits", "long", "no-output"]
    with pytest.raises(ValueError, match="no room for a prompt"):
        bench.clip_like_vidur([RequestArrival("all-output", 0.0, 5, 4096)], 4096)


def test_vidur_trace_keeps_every_request_exactly(tmp_path):
    requests = bench.load_slice(200)
    path = tmp_path / "trace.csv"
    bench.write_vidur_trace(requests, path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Date", "Time", "PromptTokenCount", "CompletionTokenCount"]
    assert {row["Date"] for row in rows} == {bench.VIDUR_TRACE_DATE}
    assert [
        (float(row["Time"]), int(row["PromptTokenCount"]), int(row["CompletionTokenCount"])) for row in rows
    ] == [(r.time, r.prompt_tokens, r.output_tokens) for r in requests]
    assert all(r.prompt_tokens + r.output_tokens <= bench.MAX_TOKENS for r in requests)


def test_every_profile_vidur_is_served_ships_unmodified_with_its_licence():
    notice = (bench.PROFILES.parent / "NOTICE.md").read_text()
    read_columns = (
        "time_stats.mlp_up_proj.median",
        "is_prefill",
        "time_stats.all_reduce.median",
        "send_recv",
    )
    for path, column in zip(driver.profile_files(bench.PROFILES), read_columns, strict=True):
        with path.open() as f:
            assert column in f.readline(), path
        # NOTICE.md lists each file with its SHA-256: the copies are Vidur's own, byte for byte.
        relative = path.relative_to(bench.PROFILES.parent).as_posix()
        assert f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {relative}" in notice
    assert "MIT License" in (bench.PROFILES.parent / "LICENSE").read_text()


def test_tables_give_median_ratios_and_ranges():
    row = bench.ROWS[0]
    process = bench.Process  # wall, CPU, peak RSS

    def vidur(loop_cpu: float, proc: tuple[float, float, float]):
        return bench.VidurRun(loop_cpu * 2, loop_cpu, process(*proc), 59_000, 3, 3328, 37.6, 5.0, 2.0)

    vidur_runs = [
        vidur(10.0, (40.0, 20.0, 1000.0)),
        vidur(12.0, (48.0, 24.0, 1100.0)),
        vidur(14.0, (44, 22, 1050)),
    ]
    project = [
        bench.ProjectRun([0.1] * 3, [0.01, 0.02, 0.03], process(2.0, 0.5, 50.0), 33_000, 7, 0),
        bench.ProjectRun([0.1] * 3, [0.02, 0.02, 0.04], process(2.0, 0.7, 52.0), 33_000, 7, 0),
    ]
    comparison = bench.Comparison(10_000, row, vidur_runs, project)
    lines = bench.table([comparison])
    cells = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert len(cells) == len(lines[0].strip("|").split("|"))
    assert cells[:3] == ["10,000", "vllm", row.label]
    assert cells[3] == "59,000 / 33,000"
    assert cells[4:7] == ["10.00-14.00", "0.010-0.040", "600x"]  # CPU: 12 / 0.02
    assert cells[7:10] == ["20.0-24.0", "0.50-0.70", "37x"]  # 22 / 0.6
    assert cells[10:] == ["1,000-1,100 / 50-52", "21x"]  # 1050 / 51
    wall = [cell.strip() for cell in bench.wall_table([comparison])[-1].strip("|").split("|")]
    assert wall[2:] == ["20.00-28.00", "0.100", "240x", "40.0-48.0", "2.00", "22x"]
    (work,) = bench.work_lines([comparison])
    assert (
        "7 preemptions" in work
        and "3 restarts" in work
        and "37.6 requests per batch" in work
        and "import 5.0 s" in work
    )
