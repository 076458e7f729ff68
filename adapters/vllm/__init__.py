"""Hooks that run inside a vLLM engine and stream what it does to the shadow.

- `MirrorScheduler` / `MirrorAsyncScheduler` (`--scheduler-cls vllm_shadow.MirrorScheduler`): every arrival,
  every step's exact batch and every finish. See `vllm_shadow.adapters.vllm.scheduler`.
- `ShadowStatLogger` (entry point `vllm.stat_logger_plugins`): arrivals and finishes of finished requests,
  from vLLM's per-request stats. See `vllm_shadow.adapters.vllm.stat_logger`.
Both publish to the destinations named by SHADOW_* environment variables (`vllm_shadow.adapters.vllm.env`).
"""

from typing import Any

__all__ = ["MirrorAsyncScheduler", "MirrorScheduler"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the vLLM-free parts of this package (mirror, env) import without loading vLLM.
    if name in __all__:
        from vllm_shadow.adapters.vllm import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'vllm_shadow.adapters.vllm' has no attribute {name!r}")
