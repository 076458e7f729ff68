"""The `EngineInfo` announcement built from a live vLLM configuration."""

from __future__ import annotations

import json
from typing import Any

from vllm_shadow.adapters.events import EngineInfo, SchedulerSettings


def scheduler_settings(vllm_config: Any) -> SchedulerSettings:
    sc = vllm_config.scheduler_config
    # The scheduler's budget is max_num_scheduled_tokens when set (vLLM 0.32), else max_num_batched_tokens.
    budget = getattr(sc, "max_num_scheduled_tokens", None) or sc.max_num_batched_tokens
    return SchedulerSettings(
        policy=str(sc.policy),
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=bool(sc.enable_chunked_prefill),
        long_prefill_token_threshold=sc.long_prefill_token_threshold or 0,
        enable_prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
        max_model_len=vllm_config.model_config.max_model_len,
        watermark=float(getattr(sc, "watermark", 0.0)),
        scheduler_reserve_full_isl=bool(getattr(sc, "scheduler_reserve_full_isl", False)),
        async_scheduling=bool(sc.async_scheduling),
    )


def model_config_dict(vllm_config: Any) -> dict:
    """The Hugging Face config as plain JSON values (dtype objects and the like become strings)."""
    try:
        raw = vllm_config.model_config.hf_config.to_dict()
    except AttributeError:
        return {}
    return json.loads(json.dumps(raw, default=str))


def engine_info(vllm_config: Any, num_kv_blocks: int, block_size: int, engine: str) -> EngineInfo:
    return EngineInfo(
        model=str(vllm_config.model_config.model),
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        scheduler=scheduler_settings(vllm_config),
        engine=engine,
        model_config=model_config_dict(vllm_config),
        tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
    )
