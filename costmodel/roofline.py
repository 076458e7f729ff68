"""A roofline estimate of one engine step, and the INFERMAX linear prior fitted to it.

A step is split into phases that run one after another on the GPU; each phase is bound by its compute time or
its memory time at achievable (not peak) rates, plus a kernel latency floor:
  matmuls     the layers' projections and MLP/experts over all T new tokens (weights streamed once per step),
  LM head     the vocabulary projection of each request's last position only (its weights streamed once
              per step, its FLOPs per request: the source of the prior's per-request coefficient e),
  attention   QK^T and AV over every request's context (FlashAttention: K and V read once per step),
  elementwise norms, rotary embedding, activation and residual adds: pure memory traffic plus launch latency,
  all-reduce  two per layer under tensor parallelism,
  overhead    a fixed per-step cost outside the GPU kernels (scheduling, input preparation, sampling).

The achievable fractions and latencies in `RooflineAssumptions` are fitted to Vidur's measured per-operator
timings (Agrawal et al., MLSys 2024, MIT licence; the subset in benchmarks/data/vidur-profiling): Llama-2-7B,
Llama-3-8B and Llama-2-70B layers at TP 1-8 on the A100 80GB and H100, 1-4096 tokens, and FlashAttention on
Llama-2-70B at TP 2 on the A100. benchmarks/vidur_prior_check.py reproduces the comparison; the mean absolute
errors there are 5.6% for matmuls, 17% for the small kernels, 14% for decode attention and 13% for prefill
attention (over 380, 380, 64 and 72 measurements).
  - Matmuls run at 74% of dense peak when compute-bound and stream weights at 86% of peak bandwidth when
    memory-bound, plus about 6 us per GEMM kernel (launch, tail, partial waves), which matters at high TP.
    Near the ridge point (32-256 tokens, where serving engines spend their decode steps) a GEMM is slower
    than both bounds: sqrt(compute^2 + memory^2) fits the measurements better than max(compute, memory)
    (mean error 5.6% against 7.3%).
  - Attention kernels behave as if they computed the whole rectangle of new queries by attended keys (the
    causal half is not skipped in practice) at 36% of peak, read the KV cache at 70% of peak bandwidth, and
    cost at least 14 us per layer.
  - Norms, rotary, activation and residual add move their activations at 60% of peak bandwidth and cost at
    least 3 us each.
  - All-reduce over NVLink reaches 58-65% of the one-way link bandwidth for large messages on A100 pairs. For
    small messages Vidur's NCCL measurements show 7-60 us; vLLM replaces NCCL with its own all-reduce for
    small messages on NVLink, so the low end, 10 us, is assumed.
The per-step overhead (scheduling, input preparation, sampling) is not in Vidur's operator data: 1 ms is
assumed, and online calibration replaces it with the engine's own intercept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.hardware import Hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel, batch_features, fit_linear


@dataclass(frozen=True, slots=True)
class RooflineAssumptions:
    """Achievable fractions of peak and fixed latencies; the evidence is in the module docstring."""

    matmul_flops_fraction: float = 0.74
    weight_bandwidth_fraction: float = 0.86
    gemm_latency_s: float = 6e-6
    gemms_per_layer: int = 4  # fused qkv, o, fused gate-up (or the fused MoE kernel), down
    attention_flops_fraction: float = 0.36  # of the query-by-key rectangle, see the module docstring
    kv_bandwidth_fraction: float = 0.7
    attention_latency_s: float = 14e-6
    elementwise_bandwidth_fraction: float = 0.6
    small_kernel_latency_s: float = 3e-6
    small_kernels_per_layer: int = 5  # two norms, rotary, activation, residual add
    link_fraction: float = 0.6  # of the one-way link bandwidth a ring all-reduce achieves
    allreduce_latency_s: float = 10e-6
    step_overhead_s: float = 1e-3


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
    layers = arch.num_layers
    flops_rate = hw.peak_flops * s.matmul_flops_fraction
    weight_rate = hw.memory_bandwidth * s.weight_bandwidth_fraction
    tokens = sum(new for new, _ in requests)

    matmuls = layers * s.gemms_per_layer * s.gemm_latency_s + _soft_roofline(
        arch.linear_flops(tokens, 0, tp) / flops_rate, arch.matmul_weight_bytes(tokens, tp) / weight_rate
    )
    lm_head = s.gemm_latency_s + _soft_roofline(
        arch.linear_flops(0, len(requests), tp) / flops_rate, arch.lm_head_bytes(tp) / weight_rate
    )

    kv_bytes = arch.kv_bytes_per_token(tp)
    rectangle = sum(new * arch.attended_keys(new, ctx) for new, ctx in requests)
    # K and V of the attended positions are read once; the new tokens' K and V are written once.
    attention_bytes = sum((arch.attended_keys(new, ctx) + new) * kv_bytes for new, ctx in requests)
    attention = layers * s.attention_latency_s + max(
        arch.attention_flops_per_pair(tp) * rectangle / (hw.peak_flops * s.attention_flops_fraction),
        attention_bytes / (hw.memory_bandwidth * s.kv_bandwidth_fraction),
    )

    elementwise_rate = hw.memory_bandwidth * s.elementwise_bandwidth_fraction
    elementwise = layers * (
        s.small_kernels_per_layer * s.small_kernel_latency_s
        + tokens * _elementwise_bytes_per_token(arch, tp) / elementwise_rate
    )

    allreduce = 0.0
    if tp > 1:  # two per layer: after attention's output projection and after the MLP
        message = tokens * arch.hidden_size * arch.dtype_bytes
        allreduce = 2 * layers * allreduce_seconds(hw, message, tp, assumptions)

    return StepTime(matmuls, lm_head, attention, elementwise, allreduce, s.step_overhead_s)


def allreduce_seconds(
    hw: Hardware, message_bytes: float, gpus: int, assumptions: RooflineAssumptions = DEFAULT_ASSUMPTIONS
) -> float:
    """One ring all-reduce of `message_bytes` across `gpus` GPUs: each sends and receives 2(g-1)/g of it."""
    one_way = hw.link_bandwidth / 2 * assumptions.link_fraction
    return assumptions.allreduce_latency_s + 2 * (gpus - 1) / gpus * message_bytes / one_way


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
    short to long contexts, single prefills and prefill chunks on top of cached context, several new prompts
    prefilled together, and chunked-prefill steps mixing one chunk with decodes. The batched prompts are what
    tells the per-request cost from the per-token one: the number of requests R equals the tokens T on every
    decode batch and is 1 on every single prefill. Steps that would hold more KV than the cache has are left
    out: a fit that spends its accuracy on batches no engine can run is a worse prior."""
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
    for chunk in chunks:
        for prompts in (4, 16):
            if chunk // prompts >= 16:
                batches.append(([chunk // prompts] * prompts, [0] * prompts))
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
    """The linear model (`vllm_shadow.costmodel.linear`) fitted to roofline times over
    `representative_batches`: the cost
    model to use before the engine has produced measurements, and the prior that online calibration starts
    from. Its per-request coefficient e is what the LM head's per-row FLOPs add to its weight streaming: on a
    GPU the streaming dominates until hundreds of rows, so e comes out negligible or is dropped by the fit's
    BIC selection; on a CPU core it is a large part of a decode. The sampler's per-request work is not in
    the roofline (its fixed step overhead stands for sampling), so calibration adds that part of e."""
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


def _soft_roofline(compute: float, memory: float) -> float:
    """A GEMM's time from its compute-bound and memory-bound times: the larger, rounded up near the ridge."""
    return math.hypot(compute, memory)


def _elementwise_bytes_per_token(arch: ModelArchitecture, tp: int) -> int:
    """Activation bytes per token per layer moved by the unfused kernels: each RMSNorm reads and writes the
    hidden state plus the residual (vLLM fuses the add into the norm), rotary reads and writes q and k, and
    the gated activation reads gate and up and writes their product for each routed expert."""
    q_width = arch.num_heads // tp * arch.head_dim
    k_width = arch.kv_heads_per_gpu(tp) * arch.head_dim
    activation_width = arch.experts_per_token * arch.intermediate_size // tp
    elements = 2 * 4 * arch.hidden_size + 2 * (q_width + k_width) + 3 * activation_width
    return elements * arch.dtype_bytes
