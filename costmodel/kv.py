"""How many KV-cache blocks an engine gets: the estimate vLLM's memory profiler makes at start-up.

vLLM budgets `gpu_memory_utilization` of each GPU's memory for the whole instance, then gives the KV cache
what is left after the weights, the activation peak of a profiling forward pass over `max_num_batched_tokens`
tokens, and memory allocated outside PyTorch (CUDA graphs, NCCL and cuBLAS workspaces). A live engine reports
its real block count (`cache_config_info`), which always wins over this estimate; the estimate serves offline
what-if questions ("how many blocks at TP 2 on an H100?").
"""

from __future__ import annotations

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.hardware import GIB, Hardware

# vLLM's start-up log reports 0.2-1 GiB of "non-torch memory" on single-GPU NVIDIA deployments (more with CUDA
# graphs captured for many batch sizes); the upper end is reserved so the estimate errs towards fewer blocks.
NON_TORCH_RESERVE_BYTES = 1 * GIB


def peak_activation_bytes(arch: ModelArchitecture, num_tokens: int, tp: int = 1) -> int:
    """Largest live activations of one forward pass over `num_tokens` tokens on one GPU: the gated MLP's gate
    and up outputs and their product for each routed expert, beside a few hidden-size tensors (the residual
    stream, the normalised input and the attention output). The logits of the profiling sampler run are left
    to the fixed reserve."""
    mlp_width = arch.experts_per_token * arch.intermediate_size // tp
    return num_tokens * (3 * mlp_width + 4 * arch.hidden_size) * arch.dtype_bytes


def kv_capacity_blocks(
    arch: ModelArchitecture,
    hw: Hardware,
    *,
    tp: int = 1,
    block_size: int = 16,
    memory_fraction: float = 0.9,
    max_num_batched_tokens: int = 8192,
    kv_dtype_bytes: int | None = None,
) -> int:
    """KV-cache blocks of `block_size` tokens per engine (each block spans all `tp` GPUs' shards of its
    tokens)."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    budget = memory_fraction * hw.memory_bytes
    used = (
        arch.weight_bytes(tp)
        + peak_activation_bytes(arch, max_num_batched_tokens, tp)
        + NON_TORCH_RESERVE_BYTES
    )
    if used >= budget:
        raise ValueError(
            f"{arch.name} at tp={tp} needs {used / GIB:.1f} GiB per GPU before any KV cache, but "
            f"{hw.name} at memory_fraction={memory_fraction} offers {budget / GIB:.1f} GiB"
        )
    return int((budget - used) // (block_size * arch.kv_bytes_per_token(tp, kv_dtype_bytes)))
