"""The mirror hook: vLLM's own V1 scheduler, unchanged, that also reports every arrival, step and finish.

Use `vllm_shadow.MirrorScheduler` as `--scheduler-cls` / `scheduler_cls=` (also inside Ray Serve LLM's
`engine_kwargs`). Match vLLM's own choice of scheduler: `MirrorAsyncScheduler` where async scheduling is on
(the default on GPUs in vLLM 0.32), `MirrorScheduler` where it is off (always on the CPU platform, or with
`--no-async-scheduling`). Using the sync class under async scheduling still works but costs vLLM's overlap.

Every override calls vLLM's method first and returns its result untouched. What the mirror adds runs after,
inside a guard: an error in it is counted and logged once, never raised into the engine; publishing is an
append to a bounded queue (see adapters.publisher), so a dead or slow shadow cannot block the engine loop.
Destinations come from SHADOW_* environment variables (adapters.vllm.env); with none set the hook is inert.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.publisher import Publisher
from vllm_shadow.adapters.vllm.engine_info import engine_info
from vllm_shadow.adapters.vllm.env import ENGINE_CORE, RecordStream, ShadowEnv
from vllm_shadow.adapters.vllm.mirror import StepMirror

logger = logging.getLogger(__name__)


class _ShadowHook:
    """What a mirrored scheduler owns besides vLLM's state: the mirror, its publisher, and an error count."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.mirror = StepMirror(publisher.publish)
        self.errors = 0
        self.live: dict[str, Request] = {}  # requests added and not yet reported finished
        self.prompt_hashes: dict[str, int] = {}  # block hashes each live request had when it arrived

    def failed(self, where: str) -> None:
        self.errors += 1
        if self.errors == 1:
            logger.exception(
                "shadow mirror failed in %s; the engine is unaffected, further errors are counted", where
            )


def _attach(scheduler: Scheduler, env: ShadowEnv) -> _ShadowHook | None:
    rank = scheduler.vllm_config.parallel_config.data_parallel_index
    # Each data-parallel engine core records to its own file (env.record_path); rank 0 to the one named.
    publisher = env.publisher(RecordStream(ENGINE_CORE, rank))
    if publisher is None:
        return None
    hook = _ShadowHook(publisher)
    engine = env.engine_label(rank, scheduler.vllm_config.parallel_config.data_parallel_size)
    info = engine_info(
        scheduler.vllm_config, scheduler.kv_cache_config.num_blocks, scheduler.block_size, engine
    )
    publisher.publish(info)
    return hook


def _hash_ints(block_hashes: Any) -> tuple[int, ...]:
    """vLLM's prefix-cache hashes (bytes) as signed 64-bit ints; empty with caching off."""
    return tuple(int.from_bytes(h[:8], "big", signed=True) for h in block_hashes)


def _cached_tokens(output: SchedulerOutput) -> dict[str, int]:
    """The prefix-cache hit of each request this step admitted: vLLM's num_computed_tokens at admission, which
    it hands the workers for new requests and for resumed ones (O(admitted), not O(running))."""
    hits = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs if r.num_computed_tokens}
    cached = output.scheduled_cached_reqs
    if cached.resumed_req_ids:
        for request_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens, strict=False):
            if num_computed and request_id in cached.resumed_req_ids:
                hits[request_id] = num_computed
    return hits


class _MirrorMixin:
    """Overrides of vLLM's public scheduler interface; combine with `Scheduler` or `AsyncScheduler`."""

    _shadow: _ShadowHook | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self._shadow = _attach(self, ShadowEnv.from_environ())  # type: ignore[arg-type]
        except Exception:
            logger.exception("shadow mirror could not start; the engine runs without it")
            self._shadow = None

    def add_request(self, request: Request) -> None:
        super().add_request(request)  # type: ignore[misc]
        hook = self._shadow
        if (
            hook is None or request.request_id in hook.live
        ):  # a streaming-input continuation is no new arrival
            return
        try:
            hook.live[request.request_id] = request
            hook.prompt_hashes[request.request_id] = len(request.block_hashes)
            hook.mirror.arrival(
                RequestArrival(
                    request_id=request.request_id,
                    time=request.arrival_time,
                    prompt_tokens=request.num_prompt_tokens,
                    max_tokens=request.max_tokens,
                    priority=request.priority,
                    # vLLM's prefix-cache hashes (bytes) as signed 64-bit ints; empty with caching off.
                    block_hashes=_hash_ints(request.block_hashes),
                )
            )
        except Exception:
            hook.failed("add_request")

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        hook = self._shadow
        if hook is None:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        started = hook.mirror.schedule_started()
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        try:
            pool = self.kv_cache_manager.block_pool  # type: ignore[attr-defined]
            # The null block is never free and never used: it is not KV capacity.
            used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
            hook.mirror.step_scheduled(
                started,
                output.num_scheduled_tokens,
                tuple(output.preempted_req_ids),
                used,
                _cached_tokens(output),
            )
        except Exception:
            hook.failed("schedule")
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        hook = self._shadow
        if hook is not None:
            try:
                self._report_finished(hook)
                hook.mirror.step_completed()
            except Exception:
                hook.failed("update_from_output")
        return outputs

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[Request]:
        finished = super().finish_requests(request_ids, finished_status)  # type: ignore[misc]
        hook = self._shadow
        if hook is not None:
            try:
                self._report_finished(hook)
            except Exception:
                hook.failed("finish_requests")
        return finished

    def _report_finished(self, hook: _ShadowHook) -> None:
        # vLLM collects the ids finished since the last schedule() in `finished_req_ids` (completions and
        # aborts alike); `live` makes each report happen once however often this runs between two steps.
        for request_id in self.finished_req_ids:  # type: ignore[attr-defined]
            request = hook.live.pop(request_id, None)
            if request is not None:
                reason = request.get_finished_reason()
                # With prefix caching, the blocks its generated tokens filled are cached under these hashes.
                generated = _hash_ints(request.block_hashes[hook.prompt_hashes.pop(request_id, 0) :])
                hook.mirror.finished(
                    request_id, request.num_output_tokens, str(reason) if reason else "", generated
                )

    def shutdown(self) -> None:
        super().shutdown()  # type: ignore[misc]
        hook = self._shadow
        if hook is not None:
            try:
                hook.publisher.close()
            except Exception:
                hook.failed("shutdown")


class MirrorScheduler(_MirrorMixin, Scheduler):
    """vLLM's `Scheduler`, mirrored. For engines without async scheduling (all CPU engines)."""


class MirrorAsyncScheduler(_MirrorMixin, AsyncScheduler):
    """vLLM's `AsyncScheduler`, mirrored. For engines with async scheduling (vLLM's default on GPUs)."""
