import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import batch_features, cross_validated_mape
from vllm_shadow.costmodel.roofline import (
    DEFAULT_ASSUMPTIONS,
    representative_batches,
    roofline_batch_time,
    roofline_prior,
    roofline_step,
)

LLAMA_2_7B = load_model("llama-2-7b")
A100 = get_hardware("a100")
H100 = get_hardware("h100")


def _vidur_check():
    """The benchmark's comparison code, loaded from its file: benchmarks/ is not a package."""
    path = Path(__file__).parents[1] / "benchmarks" / "vidur_prior_check.py"
    spec = importlib.util.spec_from_file_location("vidur_prior_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _mape(rows) -> float:
    return float(np.mean([abs(r.predicted - r.measured) / r.measured for r in rows]))


def test_layer_operators_match_vidur_measurements() -> None:
    """Against Vidur's measured kernels (A100 and H100; Llama-2-7B, Llama-3-8B, Llama-2-70B; TP 1-8;
    1-4096 tokens), the matmul and small-kernel phases stay within the errors the assumptions were fitted
    to."""
    check = _vidur_check()
    rows = check.compare_layers({name: load_model(name) for name in set(check.MLP_FILES.values())})
    assert len(rows) > 300
    assert _mape([r for r in rows if r.group.startswith("matmuls")]) < 0.07
    assert _mape([r for r in rows if r.group.startswith("small")]) < 0.20


def test_attention_matches_vidur_measurements() -> None:
    rows = _vidur_check().compare_attention(load_model("llama-2-70b"))
    assert _mape([r for r in rows if r.group.startswith("decode")]) < 0.16
    assert _mape([r for r in rows if r.group.startswith("prefill")]) < 0.16


def test_prior_for_llama_2_7b_on_an_a100() -> None:
    prior = roofline_prior(LLAMA_2_7B, A100)
    assert 6e-3 <= prior.batch_time([1], [512]) <= 15e-3
    # A 4096-token prefill is 4096 * 13.5 GFLOP = 55 TFLOP of matmuls: at least 177 ms at the A100's
    # 312 TFLOP/s peak. Vidur measured 8.17 ms per layer for the matmuls and small ops alone (261 ms in all).
    assert 0.25 <= prior.batch_time([4096], [0]) <= 0.40
    assert all(value >= 0 for value in prior.to_dict().values())


def test_prior_fits_the_roofline_about_as_well_as_infermax_fits_gpus() -> None:
    # INFERMAX reports about 9% error for its linear model against real GPU runs
    capacity = kv_capacity_blocks(LLAMA_2_7B, A100, block_size=1)
    batches = representative_batches(LLAMA_2_7B.max_position_embeddings, capacity)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = np.array([roofline_batch_time(LLAMA_2_7B, A100, new, ctx) for new, ctx in batches])
    assert cross_validated_mape(features, times) < 0.15


def test_decode_is_memory_bound_and_a_long_prefill_compute_bound() -> None:
    s = DEFAULT_ASSUMPTIONS
    floors = 32 * s.gemms_per_layer * s.gemm_latency_s
    decode = roofline_step(LLAMA_2_7B, A100, [1], [100])
    weight_rate = A100.memory_bandwidth * s.weight_bandwidth_fraction
    assert decode.matmuls == pytest.approx(floors + LLAMA_2_7B.matmul_weight_bytes(1) / weight_rate, rel=1e-3)
    prefill = roofline_step(LLAMA_2_7B, A100, [4096], [0])
    flops_rate = A100.peak_flops * s.matmul_flops_fraction
    assert prefill.matmuls == pytest.approx(floors + LLAMA_2_7B.linear_flops(4096, 0) / flops_rate, rel=1e-3)
    # near the ridge point both bounds count
    ridge = roofline_step(LLAMA_2_7B, A100, [128], [0])
    compute = LLAMA_2_7B.linear_flops(128, 0) / flops_rate
    memory = LLAMA_2_7B.matmul_weight_bytes(128) / weight_rate
    assert ridge.matmuls - floors > 1.2 * max(compute, memory)
    # the LM head runs for one position per request, so it costs the same in both
    assert prefill.lm_head == decode.lm_head


def test_long_context_decode_is_dominated_by_reading_the_kv_cache() -> None:
    step = roofline_step(LLAMA_2_7B, A100, [1] * 64, [1500] * 64)
    kv_bytes = 64 * (1501 + 1) * LLAMA_2_7B.kv_bytes_per_token()  # read 1501 positions, write the new one
    kv_rate = A100.memory_bandwidth * DEFAULT_ASSUMPTIONS.kv_bandwidth_fraction
    floors = 32 * DEFAULT_ASSUMPTIONS.attention_latency_s
    assert step.attention == pytest.approx(floors + kv_bytes / kv_rate)
    assert step.attention > step.matmuls


def test_sliding_window_bounds_attention_cost() -> None:
    mistral = load_model("mistral-7b")
    at_window = roofline_step(mistral, A100, [1], [4095]).attention
    assert roofline_step(mistral, A100, [1], [30_000]).attention == pytest.approx(at_window)


def test_empty_batch_takes_no_time() -> None:
    assert roofline_batch_time(LLAMA_2_7B, A100, [], []) == 0.0
    assert roofline_batch_time(LLAMA_2_7B, A100, [0, 0], [5, 9]) == 0.0


def test_tensor_parallelism_splits_compute_and_adds_all_reduces() -> None:
    llama70 = load_model("llama-2-70b")
    tp2 = roofline_step(llama70, A100, [2048], [0], tp=2)
    tp4 = roofline_step(llama70, A100, [2048], [0], tp=4)
    assert tp2.allreduce > 0
    assert tp4.matmuls == pytest.approx(tp2.matmuls / 2, rel=0.01)
    assert tp2.total / 2 < tp4.total < tp2.total
    assert roofline_step(LLAMA_2_7B, A100, [2048], [0]).allreduce == 0.0


def test_tensor_parallelism_needs_a_link() -> None:
    with pytest.raises(ValueError, match="no GPU-to-GPU link"):
        roofline_batch_time(load_model("tiny-llama"), get_hardware("cpu"), [1], [1], tp=2)


def test_mixture_of_experts_decode_reads_only_the_routed_experts() -> None:
    mixtral = load_model("mixtral-8x7b")
    one = roofline_step(mixtral, H100, [1], [100], tp=2)
    many = roofline_step(mixtral, H100, [1] * 64, [100] * 64, tp=2)
    assert many.matmuls > 2.5 * one.matmuls  # 64 tokens touch nearly all 8 experts, one token touches 2


def test_representative_batches_cover_decode_prefill_and_mixes_within_capacity() -> None:
    batches = representative_batches(4096, kv_capacity_tokens=100_000)
    assert all(sum(new) + sum(ctx) <= 100_000 for new, ctx in batches)
    assert all(max(c + n for n, c in zip(new, ctx, strict=True)) <= 4096 for new, ctx in batches)
    decode = [b for b in batches if set(b[0]) == {1}]
    prefill = [b for b in batches if len(b[0]) == 1 and b[0][0] > 1]
    prompts = [b for b in batches if len(b[0]) > 1 and min(b[0]) > 1]
    mixed = [b for b in batches if len(b[0]) > 1 and min(b[0]) == 1 < max(b[0])]
    assert decode and prefill and prompts and mixed
    assert max(len(new) for new, _ in decode) == 256
    # a model with a 2k context gets no 4k prefills
    assert all(sum(new) <= 2048 for new, ctx in representative_batches(2048, 10**9) if len(new) == 1)


def test_representative_batches_vary_requests_independently_of_tokens() -> None:
    """R = T on decodes and R = 1 on single prefills; batched prompts give steps of the same tokens with
    1, 4 and 16 requests, without which the per-request coefficient would rest on the mixes alone."""
    requests_by_tokens: dict[int, set[int]] = {}
    for new, ctx in representative_batches(4096, kv_capacity_tokens=10**9):
        features = batch_features(new, ctx)
        requests_by_tokens.setdefault(features.tokens, set()).add(features.requests)
    assert {1, 4, 16} <= requests_by_tokens[1024]
    assert sum(len(r) >= 3 for r in requests_by_tokens.values()) >= 4


def test_prior_prices_the_lm_head_per_request_where_it_matters() -> None:
    """The tiny model's LM head (32000 x 256) is a large part of a decode on a CPU core: the prior's e is the
    roofline's marginal LM-head cost per row, which grows from the 1-to-16 to the 1-to-256 row slope (the
    soft roofline's memory part fades). On a GPU a 7B model's LM head streams once per step and a row costs
    under 1 us of compute: the prior's e is negligible, or dropped."""
    tiny, cpu = load_model("tiny-llama"), get_hardware("cpu")

    def lm_head_per_row(rows: int) -> float:
        many, one = (roofline_step(tiny, cpu, [16] * rows, [0] * rows), roofline_step(tiny, cpu, [16], [0]))
        return (many.lm_head - one.lm_head) / (rows - 1)

    e = roofline_prior(tiny, cpu).e
    assert lm_head_per_row(16) < e < lm_head_per_row(256)
    for arch, hw in ((LLAMA_2_7B, A100), (load_model("llama-3-8b"), H100)):
        prior = roofline_prior(arch, hw)
        assert prior.e * 256 < 0.01 * prior.batch_time([1] * 256, [1024] * 256)


def test_prior_batch_time_grows_with_work() -> None:
    prior = roofline_prior(load_model("llama-3-8b"), H100)
    decode_times = [prior.batch_time([1] * n, [1024] * n) for n in (1, 8, 64, 256)]
    assert decode_times == sorted(decode_times)
    prefill_times = [prior.batch_time([n], [0]) for n in (128, 512, 2048, 8192)]
    assert prefill_times == sorted(prefill_times)
