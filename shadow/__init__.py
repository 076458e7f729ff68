"""The shadow scheduler for vLLM.

`vllm_shadow.MirrorScheduler` (and `MirrorAsyncScheduler` under async scheduling) is the hook to pass to vLLM as
`--scheduler-cls`. This module imports nothing itself: vLLM's engine process loads the hook through it, and the
hook must bring in only the event schema, the publisher and the wire code (see `vllm_shadow.adapters.vllm`).
"""

from typing import Any

__all__ = ["MirrorAsyncScheduler", "MirrorScheduler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vllm_shadow.adapters.vllm import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'vllm_shadow' has no attribute {name!r}")
