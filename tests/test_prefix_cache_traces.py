"""Traces with prefix structure in `shadow replay`/`shadow optimal`: Mooncake's hash ids as the simulator's block
hashes, the prefix-cache hit rate as vLLM counts it, and requests vLLM would reject, counted, never an abort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_shadow.adapters.traces import block_hashes_for
from vllm_shadow.cli.main import main


def test_each_trace_block_id_expands_to_the_engine_blocks_it_covers():
    a = block_hashes_for((7, 8), 1024, 512, 16)
    assert len(a) == 64 == len(set(a))  # 32 engine blocks per 512-token id, each its own hash
    b = block_hashes_for((7, 9), 1024, 512, 16)
    assert a[:32] == b[:32] and not set(a[32:]) & set(b)  # the chain: equal up to the first differing id
    # Another position under the same id is another block (an id stands for its whole prefix, not its block).
    assert set(block_hashes_for((7,), 512, 512, 16)) == set(a[:32])
    assert not set(block_hashes_for((8,), 512, 512, 16)) & set(a)


def test_a_partial_trace_block_is_never_shared():
    # 1000 tokens: id 8 covers only 488 of its 512 tokens, so which tokens is unknown: none of its blocks share.
    assert block_hashes_for((7, 8), 1000, 512, 16) == block_hashes_for((7,), 512, 512, 16)
    # Fewer ids than blocks: the hashes stop where the ids do.
    assert len(block_hashes_for((7,), 2048, 512, 16)) == 32


def test_an_engine_block_straddling_two_trace_blocks_takes_the_later_id():
    # 48-token blocks: block 10 (tokens 480..527) ends in the second 512-token block, so it is shared only by
    # prompts that agree on both ids; blocks 0..9 lie in the first and are shared whenever id 1 agrees.
    a = block_hashes_for((1, 2), 1024, 512, 48)
    b = block_hashes_for((1, 3), 1024, 512, 48)
    assert len(a) == 1024 // 48
    assert a[:10] == b[:10] and a[10] != b[10]


def mooncake_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def replay_json(argv: list[str], capsys) -> list[dict]:
    assert main(["replay", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_shared_prefix_hits_are_counted_as_vllm_counts_them(tmp_path, capsys):
    # b arrives after a has finished and shares a's two 512-token blocks: it finds 1,024 cached tokens.
    trace = mooncake_file(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]},
            {"timestamp": 60_000, "input_length": 1536, "output_length": 4, "hash_ids": [1, 2, 3]},
        ],
    )
    on, orca = replay_json([trace, "--policies", "vllm,orca"], capsys)  # on by default: the trace has ids
    assert on["prefix_caching"] is True and orca["prefix_caching"] is False  # orca reserves KV: no cache
    assert (on["prefix_cache_queries"], on["prefix_cache_hits"]) == (1024 + 1536, 1024)
    assert on["prefix_cache_hit_rate"] == pytest.approx(1024 / 2560)
    [off] = replay_json([trace, "--policies", "vllm", "--prefix-caching", "off"], capsys)
    assert off["prefix_caching"] is False and off["prefix_cache_hit_rate"] is None
    assert off["prefix_cache_hits"] == off["prefix_cache_queries"] == 0
    assert on["gpu_seconds"] < off["gpu_seconds"]  # a cached token is work not done
    # A policy that names prefix caching keeps its own setting.
    [named] = replay_json([trace, "--policies", "vllm(enable_prefix_caching=false)"], capsys)
    assert named["prefix_caching"] is False and named["policy"] == "vllm"


def test_rejections_and_caps_are_counted_in_json_and_the_table(tmp_path, capsys):
    trace = mooncake_file(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 100, "output_length": 10},  # served as it is
            {"timestamp": 1, "input_length": 250, "output_length": 10},  # output cut at 256 tokens: 6
            {"timestamp": 2, "input_length": 256, "output_length": 1},  # no room for one output token
            {"timestamp": 3, "input_length": 9000, "output_length": 1},  # longer than the context
        ],
    )
    [row] = replay_json([trace, "--policies", "vllm", "--max-model-len", "256"], capsys)
    assert row["max_model_len"] == 256 and row["trace_requests"] == 4
    assert row["rejected"] == {"prompt_too_long": 2, "never_fits_kv_cache": 0}
    assert row["modified"] == {"output_capped_at_max_model_len": 1}
    assert row["requests"] == row["finished"] == 2
    # A KV cache of 8 usable blocks of 16 (128 tokens) can never hold the second request: left out, said so.
    assert main(["replay", trace, "--policies", "vllm", "--max-model-len", "256", "--kv-blocks", "9"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "prompt_too_long: 2" in out and "never_fits_kv_cache: 1" in out
    assert "vLLM itself would refuse to start with max_model_len 256" in out


def test_the_bundled_mooncake_trace_replays_on_the_default_model(capsys):
    # It used to abort ("can never fit"); its long prompts are now refused as Llama-2-7B's vLLM refuses them.
    [row] = replay_json(["mooncake-conv", "--limit", "150", "--policies", "vllm"], capsys)
    assert row["rejected"]["prompt_too_long"] > 0 and row["max_model_len"] == 4096
    assert row["requests"] == row["finished"] == 150 - sum(row["rejected"].values())
    assert row["prefix_caching"] is True and 0 < row["prefix_cache_hits"] < row["prefix_cache_queries"]
    assert 0 < row["simulate_seconds"] <= row["wall_s"]


def test_every_request_rejected_is_one_clear_error(tmp_path, capsys):
    trace = mooncake_file(tmp_path, [{"timestamp": 0, "input_length": 5000, "output_length": 1}])
    assert main(["replay", trace]) == 2
    assert "vLLM would reject every request" in capsys.readouterr().err
    assert main(["replay", trace, "--max-model-len", "1"]) == 2
    assert "--max-model-len must be >= 2" in capsys.readouterr().err


def test_optimal_reports_rejections_and_refuses_prefix_caching(tmp_path, capsys):
    trace = mooncake_file(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 40, "output_length": 3},
            {"timestamp": 1, "input_length": 60, "output_length": 2},
            {"timestamp": 2, "input_length": 300, "output_length": 2},
        ],
    )
    args = ["optimal", trace, "--gpu", "a10g", "--kv-blocks", "40", "--max-model-len", "128"]
    assert main([*args, "--time-limit", "5", "--policies", "vllm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 2 and report["rejected"]["prompt_too_long"] == 1
    assert report["prefix_caching"] is False
    assert main([*args, "--prefix-caching", "on"]) == 2
    assert "does not model prefix caching" in capsys.readouterr().err
