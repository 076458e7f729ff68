"""A roofline estimate of one engine step, and the INFERMAX linear prior fitted to it.

A step is split into phases that run one after another on the GPU; each phase takes the longer of its compute
time and its memory time at achievable (not peak) rates:
  matmuls     the layers' projections and MLP/experts over all T new tokens (weights streamed once per step),
  LM head     the vocabulary projection of each request's last position only,
  attention   QK^T and AV over every request's context (FlashAttention: K and V read once per step),
  elementwise norms, rotary embedding, activation and residual adds: pure memory traffic plus launch latency,
  all-reduce  two per layer under tensor parallelism,
  overhead    a fixed per-step cost outside the GPU kernels (scheduling, input preparation, sampling).

The achievable fractions below are checked against Vidur's measured per-operator timings (Agrawal et al.,
MLSys 2024; data in ../shared/vidur-profiling, MIT licence) for Llama-2-7B on an A100 80GB and an H100:
  - matmuls at 4096 tokens: 221 TFLOP/s on the A100 (71% of 312) and 752 on the H100 (76% of 989);
  - decode-size matmuls (1-64 tokens): 0.266 ms per layer on the A100 for 405 MB of weights, 75% of 2,039
    GB/s, and 78% of 3.35 TB/s on the H100;
  - small kernels (norms, rotary, activation, add): 4-5 us each when tiny, so their latency counts in decode;
    at 4096 tokens they move activations at about half the A100's bandwidth (0.68 ms per layer);
  - 2-GPU all-reduce over NVLink: 175 GB/s bus bandwidth on A100 pairs (58% of the 300 GB/s one-way link).
FlashAttention-2 reaches "50-73% of the theoretical maximum FLOPs/s on A100" (Dao, "FlashAttention-2", 2023,
abstract), the lower end with causal masks and short sequences; 50% is assumed. The per-step overhead is an
assumption that online calibration replaces with the engine's own intercept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from costmodel.architecture import ModelArchitecture
from costmodel.hardware import Hardware
from costmodel.kv import kv_capacity_blocks
from costmodel.linear import LinearCostModel, batch_features, fit_linear


@dataclass(frozen=True, slots=True)
class RooflineAssumptions:
    """Achievable fractions of peak and fixed latencies; the evidence for each is in the module docstring."""

    matmul_flops_fraction: float = 0.7  # large-token GEMMs: 71% (A100), 76% (H100) measured
    attention_flops_fraction: float = 0.5  # low end of FlashAttention-2's 50-73%: causal, mixed lengths
    bandwidth_fraction: float = 0.75  # weight streaming in decode GEMMs and KV reads: 75-78% measured
    elementwise_bandwidth_fraction: float = 0.5  # norms, rotary, activation at 4096 tokens: about half
    link_fraction: float = 0.6  # of the one-way link bandwidth a ring all-reduce achieves: 58% measured
    kernel_latency_s: float = 4.3e-6  # floor of a small kernel: 4.8 us measured on the A100, 3.8 on the H100
    small_kernels_per_layer: int = 6  # two norms, rotary, activation, residual add, and attention's own floor
    allreduce_latency_s: float = 10e-6  # small-message all-reduce: 7 us (A100 pair) to 28 us (H100) measured
    step_overhead_s: float = 1e-3  # assumed; the engine's measured intercept replaces it


DEFAULT_ASSUMPTIONS = RooflineAssumptions()


@dataclass(frozen=True, slots=True)
class StepTime:
    """Seconds per phase of one step; `total` is the step time."""

    matmuls: float
    lm_head: float
    attention: float
    elementwise: float
    allreduce: float
    overhead: float

    @property
    def total(self) -> float:
        return (
            self.matmuls + self.lm_head + self.attention + self.elementwise + self.allreduce + self.overhead
        )


def roofline_step(
    arch: ModelArchitecture,
    hw: Hardware,
    new_tokens: Sequence[int],
    context_tokens: Sequence[int],
    *,
    tp: int = 1,
    assumptions: RooflineAssumptions = DEFAULT_ASSUMPTIONS,
) -> StepTime:
    """Phase times of one step in which request i computes `new_tokens[i]` tokens on top of
    `context_tokens[i]` cached ones, on each of `tp` GPUs. An empty batch takes no time."""
    if len(new_tokens) != len(context_tokens):
        raise ValueError(f"{len(new_tokens)} new-token counts but {len(context_tokens)} context lengths")
    requests = [(new, ctx) for new, ctx in zip(new_tokens, context_tokens, strict=True) if new > 0]
    if not requests:
        return StepTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if tp > 1 and hw.link_bandwidth <= 0:
        raise ValueError(f"{hw.name} has no GPU-to-GPU link for tensor parallelism")
    s = assumptions
    flops_rate = hw.peak_flops * s.matmul_flops_fraction
    bytes_rate = hw.memory_bandwidth * s.bandwidth_fraction
    tokens = sum(new for new, _ in requests)
    activation_bytes = arch.dtype_bytes

    matmuls = max(
        arch.linear_flops(tokens, 0, tp) / flops_rate, arch.matmul_weight_bytes(tokens, tp) / bytes_rate
    )
    lm_head = max(arch.linear_flops(0, len(requests), tp) / flops_rate, arch.lm_head_bytes(tp) / bytes_rate)

    kv_bytes = arch.kv_bytes_per_token(tp)
    attention_flops = sum(arch.attention_flops(new, ctx, tp) for new, ctx in requests)
    # K and V of the attended window are read once; the new tokens' K and V are written once.
    attention_bytes = sum((arch.attended_keys(new, ctx) + new) * kv_bytes for new, ctx in requests)
    attention = max(
        attention_flops / (hw.peak_flops * s.attention_flops_fraction), attention_bytes / bytes_rate
    )

    elementwise_rate = hw.memory_bandwidth * s.elementwise_bandwidth_fraction
    elementwise = arch.num_layers * (
        s.small_kernels_per_layer * s.kernel_latency_s
        + tokens * _elementwise_bytes_per_token(arch, tp) / elementwise_rate
    )

    allreduce = 0.0
    if tp > 1:
        message = tokens * arch.hidden_size * activation_bytes
        one_way = hw.link_bandwidth / 2 * s.link_fraction
        per_call = s.allreduce_latency_s + 2 * (tp - 1) / tp * message / one_way  # ring all-reduce
        allreduce = 2 * arch.num_layers * per_call  # after attention's output projection and after the MLP

    return StepTime(matmuls, lm_head, attention, elementwise, allreduce, s.step_overhead_s)


def roofline_batch_time(
    arch: ModelArchitecture,
    hw: Hardware,
    new_tokens: Sequence[int],
    context_tokens: Sequence[int],
    *,
    tp: int = 1,
    assumptions: RooflineAssumptions = DEFAULT_ASSUMPTIONS,
) -> float:
    return roofline_step(arch, hw, new_tokens, context_tokens, tp=tp, assumptions=assumptions).total


def representative_batches(
    max_context: int, kv_capacity_tokens: int, max_batched_tokens: int = 8192
) -> list[tuple[list[int], list[int]]]:
    """(new_tokens, context_tokens) of the step shapes a serving engine runs: pure decode of 1-256 requests at
    short to long contexts, single prefills and prefill chunks on top of cached context, and chunked-prefill
    steps mixing one chunk with decodes. Steps that would hold more KV than the cache has are left out: a fit
    that spends its accuracy on batches no engine can run is a worse prior."""
    contexts = [c for c in (128, 512, 1024, 2048, 4096, 8192, 16384) if c < max_context] or [max_context // 2]
    batches: list[tuple[list[int], list[int]]] = []
    for size in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in contexts:
            batches.append(([1] * size, [ctx] * size))
    chunks = [n for n in (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if n <= max_batched_tokens]
    for chunk in chunks:
        for ctx in [0, *contexts]:
            if ctx + chunk <= max_context:
                batches.append(([chunk], [ctx]))
    for chunk in (c for c in (256, 512, 1024, 2048) if c in chunks):
        for decodes in (8, 32, 128):
            if chunk + decodes <= max_batched_tokens:
                ctx = contexts[len(contexts) // 2]
                batches.append(([chunk] + [1] * decodes, [0] + [ctx] * decodes))
    return [(new, ctx) for new, ctx in batches if sum(new) + sum(ctx) <= kv_capacity_tokens]


def roofline_prior(
    arch: ModelArchitecture,
    hw: Hardware,
    tp: int = 1,
    *,
    assumptions: RooflineAssumptions = DEFAULT_ASSUMPTIONS,
    max_batched_tokens: int = 8192,
    memory_fraction: float = 0.9,
) -> LinearCostModel:
    """INFERMAX's linear model fitted to roofline times over `representative_batches`: the cost model to use
    before the engine has produced measurements, and the prior that online calibration starts from."""
    capacity = kv_capacity_blocks(
        arch,
        hw,
        tp=tp,
        block_size=1,
        memory_fraction=memory_fraction,
        max_num_batched_tokens=max_batched_tokens,
    )
    batches = representative_batches(arch.max_position_embeddings, capacity, max_batched_tokens)
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = np.array(
        [roofline_batch_time(arch, hw, new, ctx, tp=tp, assumptions=assumptions) for new, ctx in batches]
    )
    return fit_linear(features, times)


def _elementwise_bytes_per_token(arch: ModelArchitecture, tp: int) -> int:
    """Activation bytes per token per layer moved by the unfused kernels: each RMSNorm reads and writes the
    hidden state plus the residual (vLLM fuses the add into the norm), rotary reads and writes q and k, and
    the gated activation reads gate and up and writes their product for each routed expert."""
    q_width = arch.num_heads // tp * arch.head_dim
    k_width = arch.kv_heads_per_gpu(tp) * arch.head_dim
    activation_width = arch.experts_per_token * arch.intermediate_size // tp
    elements = 2 * 4 * arch.hidden_size + 2 * (q_width + k_width) + 3 * activation_width
    return elements * arch.dtype_bytes
