"""Hooks that run inside a vLLM engine and stream what it does to the shadow.

- `MirrorScheduler` / `MirrorAsyncScheduler` (`--scheduler-cls adapters.vllm.MirrorScheduler`): every arrival,
  every step's exact batch and every finish. See `adapters.vllm.scheduler`.
- `ShadowStatLogger` (entry point `vllm.stat_logger_plugins`): arrivals and finishes of finished requests,
  from vLLM's per-request stats. See `adapters.vllm.stat_logger`.
Both publish to the destinations named by SHADOW_* environment variables (`adapters.vllm.env`).
"""

from adapters.vllm.scheduler import MirrorAsyncScheduler, MirrorScheduler

__all__ = ["MirrorAsyncScheduler", "MirrorScheduler"]
