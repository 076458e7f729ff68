"""`shadow report` and `shadow replay` on damaged or foreign input: one clear line naming the file, never a
traceback (issue 13, items 8 and 9)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from vllm_shadow.cli.main import main

HEADER = json.dumps({"format": "shadow-events", "version": 1})
BATCH = json.dumps({"type": "batch", "source": "s", "sequence": 0, "dropped": 0})
ARRIVAL = json.dumps({"type": "arrival", "request_id": "a", "time": 1.5, "prompt_tokens": 10})


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error `shadow` prints for `argv` (exit status 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("shadow: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", ":1: empty file"),
        (HEADER.encode() + b"\n", "no events"),
        (f"{HEADER}\n{BATCH}\n{ARRIVAL}\n".encode(), "EngineInfo"),
        (f"{HEADER}\n{BATCH}\n".encode() + b"\xff\xfe\n", ":3: not UTF-8"),
    ],
)
def test_report_on_an_empty_header_only_or_binary_recording_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, fragment: str
) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(content)
    err = _error(["report", str(path), "-o", str(tmp_path / "r.html")], capsys)
    assert str(path) in err and fragment in err


def test_report_on_a_directory_or_a_non_gzip_gz_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "is a directory" in _error(["report", str(tmp_path), "-o", str(tmp_path / "r.html")], capsys)
    fake = tmp_path / "run.jsonl.gz"
    fake.write_text(HEADER + "\n")
    err = _error(["report", str(fake), "-o", str(tmp_path / "r.html")], capsys)
    assert f"{fake}: not gzip-compressed" in err


def test_report_on_a_gzip_header_only_recording_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(HEADER + "\n")
    assert str(path) in _error(["report", str(path), "-o", str(tmp_path / "r.html")], capsys)


# --- shadow replay ----------------------------------------------------------------------------------------

REPLAY = ["replay", "azure-conv", "--limit", "20", "--policies", "vllm", "--json"]


def test_replay_refuses_kv_blocks_0_rather_than_computing_them(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error([*REPLAY, "--kv-blocks", "0"], capsys)
    assert "--kv-blocks" in err and "omit" in err


def test_replay_names_a_model_config_that_is_a_json_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    err = _error([*REPLAY, "--model", str(config)], capsys)
    assert str(config) in err and "JSON object" in err


def test_replay_names_a_string_head_count_with_its_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vllm_shadow.costmodel.architecture import _BUNDLED

    config = json.loads((_BUNDLED / "llama-2-7b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "num_attention_heads": "32"}))
    err = _error([*REPLAY, "--model", str(path)], capsys)
    assert str(path) in err and "num_attention_heads" in err


@pytest.mark.parametrize("option", ["--model", "--cost-profile"])
def test_replay_names_a_file_of_bad_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"model_type": "llama",')
    err = _error([*REPLAY, option, str(path)], capsys)
    assert str(path) in err and "JSON" in err


def test_replay_names_a_mooncake_timestamp_beyond_any_clock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 5, "output_length": 2},
        {"timestamp": 1e300, "input_length": 5, "output_length": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _error(["replay", str(path), "--policies", "vllm", "--json"], capsys)
    assert re.search(re.escape(f"{path}:2: field 'timestamp'"), err)


def test_replay_reads_a_gzipped_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl.gz"
    rows = [{"timestamp": 100 * i, "input_length": 50, "output_length": 5} for i in range(10)]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert main(["replay", str(path), "--policies", "vllm", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["requests"] == row["finished"] == 10


# --- defaults a newcomer understands (issue 13) -----------------------------------------------------------


def test_replay_says_plainly_when_arrivals_exceed_what_the_engine_can_serve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bundled hour at its defaults saturates one A100: the table must say so, or TTFT p50 ~431 s reads
    as a property of the scheduler."""
    assert main(["replay", "azure-conv", "--policies", "vllm"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "arrivals exceed what this engine can serve" in out
    load = float(re.search(r"\(load (\d+\.\d+)\)", out).group(1))
    assert 1.0 < load < 1.3
    assert "--rate-scale" in out


def test_replay_within_capacity_has_no_overload_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "azure-conv", "--policies", "vllm", "--rate-scale", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "exceed" not in captured.out + captured.err


def test_replay_json_notes_the_overload_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "azure-conv", "--policies", "vllm", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays pure JSON
    assert "arrivals exceed what this engine can serve" in " ".join(captured.err.split())
