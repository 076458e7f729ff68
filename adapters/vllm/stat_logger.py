"""A vLLM stat-logger plugin that reports each finished request's arrival and finish to the shadow.

For engines whose scheduler class cannot be changed. Install the project next to vLLM and its entry point
(`vllm.stat_logger_plugins`: `shadow = adapters.vllm.stat_logger:ShadowStatLogger`) is loaded by the front end
(`vllm serve`, AsyncLLM); `LLMEngine(stat_loggers=[ShadowStatLogger])` does the same by hand (with both,
vLLM runs two, and the second stays silent). Destinations come from the SHADOW_* environment variables
(adapters.vllm.env); with several API servers (data parallel), each records to its own file.

It sees requests only once they finish, with external ids, prompt and output token counts and timings; no
batches, no preemption victims, no per-step KV use. Where the engine also runs the mirror hook, the shadow
keeps the hook's stream for that engine and ignores this one (it would count each request twice).
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_shadow.adapters.events import RequestArrival, RequestFinish
from vllm_shadow.adapters.vllm.engine_info import engine_info
from vllm_shadow.adapters.vllm.env import API_SERVER, RecordStream, ShadowEnv

logger = logging.getLogger(__name__)


# The logger reporting each engine of each vLLM front end in this process: (id(vllm_config), engine index) ->
# a weak reference to it. An engine given this class by hand (stat_loggers=) while the plugin is installed
# runs two of them: without this, they would send every report twice and write one recording twice over.
_reporting: dict[tuple[int, int], weakref.ref[ShadowStatLogger]] = {}


def _claim(logger_: ShadowStatLogger, vllm_config: VllmConfig, engine_index: int) -> bool:
    """Register `logger_` as its engine's reporter; True if another live logger already is (then it stays
    silent). The first logger holds `vllm_config`, so its id cannot be reused while that logger lives."""
    key = (id(vllm_config), engine_index)
    first = _reporting.get(key)
    if first is not None and (other := first()) is not None and other._vllm_config is vllm_config:
        logger.warning(
            "shadow stat logger loaded twice for engine %d; the second one stays silent", engine_index
        )
        return True
    _reporting[key] = weakref.ref(logger_)
    return False


class ShadowStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self._vllm_config = vllm_config
        env = ShadowEnv.from_environ()
        self._engine = env.engine_label(engine_index, vllm_config.parallel_config.data_parallel_size)
        # Its own recording: under `vllm serve` it runs in the API server, the hook in the engine core.
        duplicate = _claim(self, vllm_config, engine_index)
        # With several API servers (data parallel), each reports the requests it routed, to its own file.
        api_server = getattr(vllm_config.parallel_config, "_api_process_rank", 0)
        stream = RecordStream(API_SERVER, engine_index, max(api_server, 0))
        self._publisher = None if duplicate else env.publisher(stream)
        self.errors = 0
        if self._publisher is not None:
            # vLLM never closes a stat logger; deliver what is queued when the process exits, while gRPC and
            # Ray are still importable (a __del__ at interpreter teardown is too late).
            atexit.register(self._publisher.close, timeout=0.5)

    def log_engine_initialized(self) -> None:
        if self._publisher is None:
            return
        try:
            cache = self._vllm_config.cache_config
            info = engine_info(self._vllm_config, cache.num_gpu_blocks or 0, cache.block_size, self._engine)
            self._publisher.publish(info)
        except Exception:
            self._failed()

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if self._publisher is None or iteration_stats is None or not iteration_stats.finished_requests:
            return
        try:
            now = iteration_stats.iteration_timestamp
            for done in iteration_stats.finished_requests:
                # vLLM measures e2e from the request's arrival to this iteration: arrival = now - e2e.
                self._publisher.publish(
                    RequestArrival(
                        request_id=str(done.request_id),
                        time=now - done.e2e_latency,
                        prompt_tokens=done.num_prompt_tokens,
                        output_tokens=done.num_generation_tokens,
                        max_tokens=done.max_tokens_param,
                    )
                )
                self._publisher.publish(
                    RequestFinish(
                        str(done.request_id), now, done.num_generation_tokens, str(done.finish_reason)
                    )
                )
        except Exception:
            self._failed()

    def _failed(self) -> None:
        # A stat logger runs in vLLM's output path: count and log once, never raise into it.
        self.errors += 1
        if self.errors == 1:
            logger.exception("shadow stat logger failed; vLLM is unaffected, further errors are counted")
