"""Iteration-level simulator: replays requests through one scheduling loop, step by step.

Each step the policy picks the batch (new tokens per request) under the KV blocks, the token budget and the
sequence cap; the cost model gives the step's time; prefill chunks advance, a completed prefill or a decode step
emits one token, a preempted request drops its KV and later recomputes everything it had (vLLM V1 has no swap).

The loop is vLLM V1's `Scheduler.schedule()` (vllm/v1/core/sched/scheduler.py, 0.32) written out literally
(`Simulator._schedule_literal`), with vLLM's names, so that the `vllm` preset can be proven step for step against
a real engine. Two exact shortcuts make it fast enough to replay every window under tens of candidates:
  * decoding requests are tracked implicitly: an implicit decoder's num_computed_tokens is
    `decode_base + decode_steps`, where `decode_steps` counts the steps in which the implicit decoders ran, so a
    step in which every decoder runs costs O(1) for all of them (`Simulator._step_fast`);
  * a stretch of pure-decode steps with no arrival, finish, preemption or admission is advanced in closed form
    (`Simulator._fast_forward`): block crossings come from a histogram of `decode_base mod block_size`, step
    times from an arithmetic series.
Both are exact: times are integer picoseconds (so a closed-form sum equals the step-by-step sum to the last
digit), and tests compare them with plain stepping.

This file is also the compiled core: setup.py compiles it with Cython, under its own name
(`vllm_shadow.solver._simulator_compiled`, with the C types of _simulator_compiled.pxd), and this module hands out
that build's `Simulator` and `simulate` (see the end of the file); `COMPILED` says which core runs. The plain
Python stays the oracle (`pure_core()`) and the fallback: VLLM_SHADOW_PURE_PYTHON=1 selects it.
"""

from __future__ import annotations

import functools
import gc
import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from heapq import heappop, heappush
from pathlib import Path
from types import MemberDescriptorType, ModuleType, SimpleNamespace
from typing import NamedTuple

from vllm_shadow.adapters.events import EngineStep, RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver import compiled_build
from vllm_shadow.solver.kv_cache import BlockPool, HeldEntry, PrivateRun, num_blocks, num_held_blocks
from vllm_shadow.solver.policies import Policy, parse_policy

# RunningRequest is records.py's, not this file's: the compiled core and the plain-Python one then read the same class
# (a window's carried requests), the compiled core off its slots (`_slot_get`).
from vllm_shadow.solver.records import RequestRecord, RunDemands, RunningRequest, SchedulerThrashes, SimResult

try:
    import cython  # in the compiled core, Cython's compile-time module: `cython.compiled` is True there
except ImportError:  # plain Python without Cython installed: the pure core
    cython = SimpleNamespace(compiled=False)

_IN_C = cython.compiled  # whether this module runs as the compiled core

PS_PER_S = 10**12  # time is kept in integer picoseconds so that closed-form sums equal step-by-step sums


def cdiv(a: int, b: int) -> int:
    """Ceiling division, as vLLM's `cdiv`: the blocks that `a` tokens occupy."""
    return -(-a // b)


# ---- the recompute tax's definition ---------------------------------------------------------------------------
# One home for the engine's tracker (shadow/tracking/recompute.py prices a real step with it) and the simulator
# (which prices its own steps with it; here, so that the compiled core calls them as C functions). vLLM's
# recompute preemption frees a victim's KV blocks and resets its computed tokens to 0; when the victim is admitted
# again it prefills its prompt and every token it had emitted once more. The tokens it computes below the KV it
# held when it was preempted are the recomputation (a request preempted again while recomputing still owes the
# most it ever held). What they cost is the step's time minus the time of the same step without them: each
# victim's recomputed tokens are the first of its new ones, so without them it would run only the rest, from
# where its KV had been (and not at all if nothing is left).


def recomputed_tokens(computed: int, new: int, dropped_kv: int) -> int:
    """Of `new` tokens scheduled for a request holding `computed` KV tokens, those below `dropped_kv` (the KV
    its preemption dropped): computed before, computed again now."""
    return max(0, min(computed + new, dropped_kv) - computed)


def request_without_recompute(new: int, context: int, recomputed: int) -> tuple[int, int]:
    """One request of the step without its recomputation, as (new tokens, context tokens): its `recomputed`
    tokens leave its new tokens and join the KV it held before the step."""
    return new - recomputed, context + recomputed


def without_recompute(
    new_tokens: Sequence[int], context_tokens: Sequence[int], recomputed: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The step without its recomputation, as (new tokens, context tokens) per request
    (`request_without_recompute`). The tax is the step's time minus this step's time, on the same cost model."""
    if not len(new_tokens) == len(context_tokens) == len(recomputed):
        raise ValueError(
            f"{len(new_tokens)} new-token counts, {len(context_tokens)} context lengths, {len(recomputed)} "
            "recomputed counts"
        )
    without_new, without_context = [], []
    for i in range(len(new_tokens)):
        new, context = request_without_recompute(new_tokens[i], context_tokens[i], recomputed[i])
        without_new.append(new)
        without_context.append(context)
    return without_new, without_context


class _Request:
    """One request in the simulator, named as vLLM's `Request`. A request is either explicit (its
    `num_computed_tokens` and `num_output_tokens` are its own) or an implicit decoder (both follow from
    `decode_base` and the simulator's `decode_steps`; see `Simulator._num_computed_tokens`)."""

    __slots__ = (
        "arrival_time",
        "block_hashes",
        "decode_base",
        "dropped_kv",
        "ever_scheduled",
        "finish_seq",
        "finishing",
        "freed",
        "held_blocks",
        "hit_memo",
        "implicit_decoder",
        "implicit_stamp",
        "last_run_decode",
        "last_run_sampled",
        "last_run_step",
        "max_tokens",
        "num_cached_blocks",
        "num_computed_tokens",
        "num_output_tokens",
        "num_prompt_tokens",
        "num_reserved_blocks",
        "output_block_hashes",
        "prev_run_step",
        "priority",
        "private_run",
        "queue_index",
        "queue_key",
        "queue_order",
        "record",
        "request_id",
        "running_seq",
        "scheduled_blocks",
        "scheduled_computed_tokens",
        "scheduled_new_tokens",
        "scheduled_plan",
    )

    def __init__(
        self,
        request_id: str,
        arrival_time: int,
        num_prompt_tokens: int,
        max_tokens: int,
        queue_key: tuple | None,
        record: RequestRecord,
        block_hashes: tuple[int, ...] = (),
        output_block_hashes: tuple[int, ...] = (),
    ) -> None:
        self._init(
            request_id,
            arrival_time,
            num_prompt_tokens,
            max_tokens,
            queue_key,
            record,
            block_hashes,
            output_block_hashes,
        )

    def _init(
        self,
        request_id: str,
        arrival_time: int,
        num_prompt_tokens: int,
        max_tokens: int,
        queue_key: tuple | None,
        record: RequestRecord,
        block_hashes: tuple[int, ...],
        output_block_hashes: tuple[int, ...],
    ) -> None:
        """`__init__`'s work, a C function in the compiled core (`_new_request` calls it on a bare request,
        without `__init__`'s Python arguments)."""
        self.request_id = request_id
        self.arrival_time = arrival_time  # integer picoseconds
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens  # the known output length: it finishes when it has produced this many
        self.queue_key = queue_key  # waiting-queue order key (None under FCFS)
        # The key's items as C fields (`_queued_before`: the compiled core's heap), and its record's priority.
        self.queue_order = 0
        self.queue_index = 0
        self.priority = 0
        self.record = record
        self.num_output_tokens = 0  # output tokens produced (explicit requests only)
        self.ever_scheduled = False  # whether a step ran any of its tokens (its record's first_scheduled)
        self.num_computed_tokens = 0  # tokens whose KV is held (explicit requests only)
        self.implicit_decoder = False  # decoding with num_computed_tokens == decode_base + decode_steps
        self.decode_base = 0
        self.finish_seq = -1  # its entry in the finish heap (the latest pushed): older entries are stale
        self.num_reserved_blocks = 0  # blocks reserved at admission (no-eviction mode)
        # The most KV its recompute preemptions dropped: what it computes below that is recomputation (the
        # recompute tax's definition, `recomputed_tokens`, as the engine's tracker keeps it).
        self.dropped_kv = 0
        # Prefix caching (see solver.kv_cache): vLLM's hashes of its full prompt blocks, the cached blocks with
        # such a hash it holds (a prefix of its block table, as runs) and vLLM's num_cached_block (its leading
        # blocks that have a hash; past held_blocks they are private).
        self.block_hashes = block_hashes
        # Its generated blocks' hashes, published with its finish: named when it finishes (below, in
        # _free_cached_blocks); until then those blocks are private, as vLLM's are to every other request.
        self.output_block_hashes = output_block_hashes
        # (None until it is admitted under prefix caching, which gives it its list: most requests of a replay
        # without prefix caching never need one.)
        self.held_blocks: list[HeldEntry] | None = None
        self.num_cached_blocks = 0
        self.private_run: PrivateRun | None = None  # its private blocks in the free queue, since it was freed
        self.hit_memo: tuple | None = None  # (pool version, num_tokens, its lookup) while it waits
        self.running_seq = 0  # when it joined the running queue: its place there (but for decode_first)
        # Async scheduling: its last token is in flight (it finishes when that step's output is processed);
        # when it became an implicit decoder; its last two runs (steps), and whether the last decoded and
        # sampled: what vLLM had cached of it when it is preempted depends on the token in flight.
        self.finishing = False
        self.freed = False  # its blocks are freed: it leaves the running queue (`_finish_requests`)
        self.implicit_stamp = 0
        self.last_run_step = -2
        self.prev_run_step = -2
        self.last_run_decode = False
        self.last_run_sampled = False
        # Its chunk in the step being scheduled (a request is scheduled at most once a step; read only while it
        # is in that step's list): its new tokens, and the KV tokens it held when it was scheduled.
        self.scheduled_new_tokens = 0
        self.scheduled_computed_tokens = 0
        # The literal walk's implicit decoders that run: the plan (Simulator.plan_serial) that scheduled it as
        # one, and the blocks allocated for it there. C fields, where a dictionary keyed by id() cost a Python int
        # and a hash insert per decoder and step (most of a literal walk's time).
        self.scheduled_plan = 0
        self.scheduled_blocks = 0


# A step's scheduled pieces of work are its requests, each with its chunk in its fields `scheduled_new_tokens`
# and `scheduled_computed_tokens` (C fields in the compiled core: no tuple and no Python ints per chunk).


class StepPlan(NamedTuple):
    """What the literal `schedule()` decided for one step, in `Simulator._apply`'s argument order: the explicit
    requests' chunks, the requests it preempted, and how many implicit decoders run one token each (all of
    them, or none in a prefill-only step)."""

    scheduled: list[_Request]
    preempted: list[_Request]
    num_implicit_decoders: int


class _WaitingQueue:
    """The waiting queue: FCFS (preempted go to the front, as vLLM's `prepend_request`) or a heap on the policy's
    order key. The FCFS queue is a list read from `head` (not a deque: in the compiled core a list's items and a
    C index cost no Python call); the requests before `head` have left, and are dropped once they are half of it.
    The heap is heapq's over (queue_key, request) pairs in plain Python (the oracle); in the compiled core a heap of
    the requests themselves ordered by the key's C fields (`_heap_push`, `_heap_pop`): no tuple comparisons.
    Keys are distinct (their last item is the request's index), so both pop the same order.
    `in_arrival_order` says whether the queue has stayed in (arrival, index) order, where FCFS's list and, at one
    priority, the heap pop alike (`RunDemands.arrival_order`): `tail` is the list's last (the latest fed, or a
    request given back to an empty queue), still waiting while the queue is not empty."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.fifo: list[_Request] = []
        self.head = 0
        self.heap: list = []  # (queue_key, request) pairs, or in the compiled core requests
        self.size = 0  # an attribute, not __len__: it is read on every step
        self.in_arrival_order = True
        self.tail: _Request | None = None

    def add_request(self, request: _Request) -> None:
        if self.size and _arrived_before(request, self.tail):  # type: ignore[arg-type]
            self.in_arrival_order = False
        self.tail = request
        self.size += 1
        if not self.ordered:
            self.fifo.append(request)
        elif _IN_C:
            _heap_push(self.heap, request)
        else:
            heappush(self.heap, (request.queue_key, request))

    def prepend_request(self, request: _Request) -> None:
        if not self.size:
            self.tail = request
        elif _arrived_before(self.peek_request(), request):
            self.in_arrival_order = False
        self.size += 1
        if self.ordered:
            if _IN_C:
                _heap_push(self.heap, request)
            else:
                heappush(self.heap, (request.queue_key, request))
        elif self.head:
            self.head -= 1
            self.fifo[self.head] = request
        else:
            self.fifo.insert(0, request)

    def peek_request(self) -> _Request:
        if not self.ordered:
            return self.fifo[self.head]
        return self.heap[0] if _IN_C else self.heap[0][1]

    def pop_request(self) -> _Request:
        self.size -= 1
        if self.ordered:
            return _heap_pop(self.heap) if _IN_C else heappop(self.heap)[1]
        request = self.fifo[self.head]
        self.head += 1
        if self.head >= 32 and 2 * self.head >= len(self.fifo):
            del self.fifo[: self.head]
            self.head = 0
        return request


def _queued_before(a: _Request, b: _Request) -> bool:
    """Whether `a`'s queue key is below `b`'s: the key tuple's order, (queue_order, arrival_time, queue_index),
    on C fields in the compiled core."""
    if a.queue_order != b.queue_order:
        return a.queue_order < b.queue_order
    if a.arrival_time != b.arrival_time:
        return a.arrival_time < b.arrival_time
    return a.queue_index < b.queue_index


def _arrived_before(a: _Request, b: _Request) -> bool:
    """Whether `a` is before `b` in (arrival_time, queue_index) order: FCFS's, and priority order's at one
    priority."""
    if a.arrival_time != b.arrival_time:
        return a.arrival_time < b.arrival_time
    return a.queue_index < b.queue_index


def _heap_push(heap: list[_Request], request: _Request) -> None:
    """heapq.heappush on `_queued_before`'s order."""
    heap.append(request)
    pos = len(heap) - 1
    while pos > 0:
        parent_pos = (pos - 1) >> 1
        parent = heap[parent_pos]
        if not _queued_before(request, parent):
            break
        heap[pos] = parent
        pos = parent_pos
    heap[pos] = request


def _heap_pop(heap: list[_Request]) -> _Request:
    """heapq.heappop on `_queued_before`'s order: the last request sifts down from the root."""
    last = heap.pop()
    size = len(heap)
    if not size:
        return last
    top = heap[0]
    pos = 0
    child = 1
    while child < size:
        if child + 1 < size and _queued_before(heap[child + 1], heap[child]):
            child += 1
        if not _queued_before(heap[child], last):
            break
        heap[pos] = heap[child]
        pos = child
        child = 2 * pos + 1
    heap[pos] = last
    return top


class Simulator:
    """One engine's scheduler and KV cache under `policy`, with step times from `cost`."""

    def __init__(
        self,
        policy: Policy,
        cost: LinearCostModel,
        num_kv_blocks: int,
        block_size: int,
        *,
        record_steps: bool = False,
        fast_forward: bool = True,
        max_steps: int | None = None,
    ) -> None:
        if num_kv_blocks < 2 or block_size < 1:
            raise ValueError(
                f"need num_kv_blocks >= 2 and block_size >= 1, got {num_kv_blocks}, {block_size}"
            )
        self.policy = policy
        # The policy's knobs that the loop reads on every step, copied into plain fields (C fields in the
        # compiled core: an attribute of the frozen Policy costs a dictionary lookup there).
        self.max_num_seqs = policy.max_num_seqs
        # The most the run's tests of the knobs that hold a request back asked (`RunDemands`).
        self.demanded_running = 0
        self.demanded_tokens = 0
        self.demanded_chunk = 0
        # Whether a victim was picked, and whether each rule would have picked every one (`_note_victim`).
        self.picked_victim = False
        self.newest_victims = True
        self.least_computed_victims = True
        self.worst_priority_victims = True
        self.max_num_batched_tokens = policy.max_num_batched_tokens
        self.long_prefill_token_threshold = policy.long_prefill_token_threshold
        self.chunked_prefill = policy.chunked_prefill
        self.decode_first = policy.decode_first
        self.eviction = policy.eviction
        self.continuous_batching = policy.batching == "continuous"
        self.prefill_first = policy.batching == "prefill-first"
        self.static_batching = policy.batching == "static"
        self.admit_full_prompt = policy.admission == "full-prompt"
        self.admit_future_peak = policy.admission == "future-peak"
        self.priority_order = policy.order == "priority"
        self.least_computed_victim = policy.victim == "least-computed"
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.num_usable_blocks = num_kv_blocks - 1  # vLLM reserves one null block
        self.watermark_blocks = int(policy.watermark * num_kv_blocks)
        # The cost model's terms in integer picoseconds (see LinearCostModel: a + b*T + c*K + d*P + e*R).
        # (`_to_ps`: round(x * PS_PER_S), in C in the compiled core.)
        self.step_ps = _to_ps(cost.a)  # per non-empty step
        self.token_ps = _to_ps(cost.b)  # per new token
        self.kv_token_ps = _to_ps(cost.c)  # per KV token attended
        self.attention_pair_ps = _to_ps(cost.d)  # per prefill query-key pair
        self.request_ps = _to_ps(cost.e)  # per request in the step
        self.record_steps = record_steps
        self.fast = fast_forward
        self.max_steps = sys.maxsize if max_steps is None else max_steps
        self.running: list[_Request] = []
        self.waiting = _WaitingQueue(policy.order != "fcfs")
        self.num_used_blocks = 0
        self.num_reserved_blocks = 0  # blocks reserved by admitted requests (no-eviction mode)
        self.now = 0  # picoseconds
        self.busy_ps = 0
        self.recompute_ps = 0  # of busy_ps, the recompute tax (`without_recompute`): on recomputing steps
        self.num_steps = 0
        self.peak_used_blocks = 0
        self.num_tokens_processed = 0
        # Implicit decoders. Invariant: each one's num_computed_tokens == decode_base + decode_steps and
        # num_output_tokens == num_computed_tokens - num_prompt_tokens + 1 (every computed token but the last
        # sampled one). The sums below let a step of all of them be priced, and their block crossings counted,
        # without visiting any of them.
        self.decode_steps = 0
        self.num_implicit_decoders = 0
        self.sum_decode_base = 0
        # The implicit decoders counted by decode_base mod block_size: which of them open a block at each step.
        # (Arrays of C integers, not lists: in the compiled core their items are C integers, no Python ints.)
        self.decode_base_residues = _zeros(block_size)
        # When the implicit decoders finish: a binary heap of (decode_steps at which it finishes, push number)
        # in two arrays (`_push_finish`, `_pop_finish`), finish_heap_size of them in use; the push number indexes
        # finish_heap_requests, and is stale unless it is
        # the request's finish_seq while it is an implicit decoder.
        self.finish_steps = _zeros(64)
        self.finish_seqs = _zeros(64)
        self.finish_heap_size = 0
        self.finish_heap_requests: list[_Request] = []
        self.finish_heap_pushes = 0
        # The heap's first finish (its top's decode_steps; _NEVER when empty): most steps finish nobody.
        self.next_finish = _NEVER
        self.admission_blocked = False  # last step's admission failed in a way a decode stretch cannot undo
        self.step_log: list[EngineStep] = []
        # Recording, the implicit decoders' scheduled tokens (one each), kept as they come and go: a step's record
        # starts from a copy of it instead of a walk of the running queue.
        self.implicit_tokens: dict[str, int] = {}
        # Prefix caching: num_used_blocks counts the blocks some request holds; a cached block nobody holds is
        # free (and evictable), as in vLLM's pool. The hits of this step's admissions, for the step record.
        self.caching = policy.enable_prefix_caching
        self.block_pool = BlockPool()
        self.step_cached_tokens: dict[str, int] = {}
        # Async scheduling (vLLM's AsyncScheduler behind EngineCore's batch queue of two): step N+1 is scheduled
        # before step N's output is processed. The requests whose last token step N produced are `finishing`:
        # skipped, still running and holding their blocks while step N+1 is scheduled, freed after it.
        self.async_scheduling = policy.async_scheduling
        self.finishing: list[_Request] = []
        self.last_decode_step = -2  # the last step in which the implicit decoders ran
        self.num_running_seq = 0
        # The literal walk's plans, numbered (a request's scheduled_plan names the plan it runs in as an
        # implicit decoder), and how many implicit decoders the current plan runs.
        self.plan_serial = 0
        self.num_scheduled_decoders = 0
        self.peak_jobs = _zeros(0)  # LightLLM's check's jobs (`_peak_fits`)
        # Under LightLLM's check, the implicit decoders in the order of their jobs there (`_peak_before`).
        self.peak_order: list[_Request] = []

    # ---- the driver ----------------------------------------------------------------------------------------

    def add_running(self, request: _Request, num_computed_tokens: int, num_output_tokens: int) -> None:
        """Put a request that already holds KV at the tail of the running queue (the initial state)."""
        request.num_output_tokens = num_output_tokens
        request.num_computed_tokens = num_computed_tokens
        if (
            not 0 <= num_computed_tokens <= request.num_prompt_tokens + num_output_tokens
            or num_output_tokens >= request.max_tokens
        ):
            raise ValueError(
                f"initial request {request.request_id}: inconsistent state computed={num_computed_tokens} "
                f"gen={num_output_tokens}"
            )
        if not self.eviction:
            request.num_reserved_blocks = cdiv(
                request.num_prompt_tokens + request.max_tokens - 1, self.block_size
            )
            self.num_reserved_blocks += request.num_reserved_blocks
        self.running.append(request)
        self.num_running_seq += 1
        request.running_seq = self.num_running_seq
        self.num_used_blocks += cdiv(num_computed_tokens, self.block_size)
        if self.caching:
            self._hold_initial_blocks(request)
        if num_output_tokens > 0 and num_computed_tokens == request.num_prompt_tokens + num_output_tokens - 1:
            self._to_implicit(request)

    def add_finishing(self, request: _Request, num_computed_tokens: int) -> None:
        """Put a request whose last token is in flight at the tail of the running queue (the initial state,
        async scheduling): the running request it was before that token, holding its blocks until the first
        step's output is processed (`finishing`)."""
        self.add_running(request, num_computed_tokens, request.max_tokens - 1)
        request.num_output_tokens = request.max_tokens
        request.finishing = True
        self.finishing.append(request)

    def _hold_initial_blocks(self, request: _Request) -> None:
        """An initial request's full blocks are cached; one whose hash another initial request already holds
        is shared (held once), as the engine's own prefix cache would have it."""
        num_full_blocks = request.num_computed_tokens // self.block_size
        request.held_blocks = []
        self.num_used_blocks -= self.block_pool.hold_initial(
            request.held_blocks, request.block_hashes, num_full_blocks
        )
        request.num_cached_blocks = num_full_blocks

    def run(self, arrival_whens: list[int], arriving: list[_Request], by_step: bool) -> None:
        """Step the engine until the `arriving` requests and those in the queues have finished. `arrival_whens`
        (ascending, one per arriving request) are times in picoseconds: the step starting now sees what arrived
        by now; or, `by_step`, the engine step count at which each enters the waiting queue. Two plain lists
        rather than one of records: they are read on every step."""
        num_arrivals = len(arriving)
        next_arrival = 0
        # A policy can thrash forever (preempting and readmitting without finishing anything: V0's prefill-first
        # batching under priority preemption on a tiny KV cache does). Past this much computation the run
        # stops with an error instead of spinning: every request computed a hundred times over.
        num_tokens = 0
        for request in arriving:
            num_tokens += request.num_prompt_tokens + request.max_tokens
        for request in self.running:
            num_tokens += request.num_prompt_tokens + request.max_tokens
        max_tokens_processed = _THRASH_FACTOR * (num_tokens + _THRASH_FACTOR)
        while True:
            if self.num_steps >= self.max_steps:
                return
            clock = self.num_steps if by_step else self.now
            fed = False
            while next_arrival < num_arrivals:
                when = arrival_whens[next_arrival]  # a C integer in the compiled core
                if when > clock:
                    break
                self.waiting.add_request(arriving[next_arrival])
                next_arrival += 1
                fed = True
            if fed:
                self.admission_blocked = False
            if not self.running and not self.waiting.size:
                if next_arrival == num_arrivals:
                    return
                next_arrival = self._feed_idle(arrival_whens, arriving, next_arrival, by_step)
                continue
            if self.fast:
                upcoming = arrival_whens[next_arrival] if next_arrival < num_arrivals else None
                if self._fast_forward(None if by_step else upcoming, upcoming if by_step else None):
                    continue
                if self._step_fast():
                    continue
            if self.num_tokens_processed > max_tokens_processed:
                raise SchedulerThrashes(
                    f"scheduler {self.policy} thrashes: {self.num_tokens_processed:,} tokens computed in "
                    f"{self.num_steps:,} steps, a hundred times the requests' own, with {len(self.running)} "
                    f"running and {self.waiting.size} waiting"
                )
            plan = self._schedule_literal()
            if not plan.scheduled and not plan.num_implicit_decoders:
                if self.finishing:  # an empty round: its update still processes the previous step's output
                    self._free_finishing()
                    continue
                if plan.preempted:
                    continue  # the step only preempted; the next one admits
                if next_arrival < num_arrivals:  # nothing fits until something arrives
                    next_arrival = self._feed_idle(arrival_whens, arriving, next_arrival, by_step)
                    continue
                raise RuntimeError(
                    f"scheduler {self.policy} is stuck: {len(self.running)} running, {self.waiting.size} "
                    f"waiting, {self.num_usable_blocks - self.num_used_blocks} free blocks"
                )
            self._apply(plan.scheduled, plan.preempted, plan.num_implicit_decoders)
            for request in self.running:  # hand decoders the literal walk made explicit back to the fast path
                if (
                    not request.implicit_decoder
                    and not request.finishing
                    and request.num_output_tokens > 0
                    and request.num_computed_tokens
                    == request.num_prompt_tokens + request.num_output_tokens - 1
                ):
                    self._to_implicit(request)

    def _feed_idle(
        self, arrival_whens: list[int], arriving: list[_Request], next_arrival: int, by_step: bool
    ) -> int:
        """Idle engine: jump to the next arrival (in time mode) and feed everything that arrives with it."""
        when = arrival_whens[next_arrival]
        if not by_step:
            self.now = max(self.now, when)
        while next_arrival < len(arriving) and arrival_whens[next_arrival] == when:
            self.waiting.add_request(arriving[next_arrival])
            next_arrival += 1
        self.admission_blocked = False
        return next_arrival

    # ---- implicit decoders ---------------------------------------------------------------------------------

    def _to_implicit(self, request: _Request) -> None:
        """`request` has just become a decoder (num_computed_tokens == num_tokens - 1) at the current
        decode_steps: from now on it advances with decode_steps, and the finish heap says when it is done."""
        request.implicit_decoder = True
        request.implicit_stamp = self.num_steps
        if self.record_steps:
            self.implicit_tokens[request.request_id] = 1
        request.decode_base = request.num_computed_tokens - self.decode_steps
        if self.admit_future_peak:
            self.peak_order.insert(_peak_place(self.peak_order, request), request)
        self.num_implicit_decoders += 1
        self.sum_decode_base += request.decode_base
        self.decode_base_residues[request.decode_base % self.block_size] += 1
        # It finishes when num_computed_tokens reaches num_prompt_tokens + max_tokens - 1.
        finish_at = request.num_prompt_tokens + request.max_tokens - 1 - request.decode_base
        request.finish_seq = self.finish_heap_pushes
        self._push_finish(finish_at, self.finish_heap_pushes)
        self.finish_heap_requests.append(request)
        self.finish_heap_pushes += 1
        if finish_at < self.next_finish:
            self.next_finish = finish_at

    def _push_finish(self, finish_at: int, seq: int) -> None:
        """Push (finish_at, seq) on the finish heap. Push numbers grow, so an entry sifts up past every entry
        that finishes later (on the same finish the older entry stays first, as heapq would order the pairs)."""
        if self.finish_heap_size == len(self.finish_steps):
            self._grow_finish_heap()
        steps, seqs = self.finish_steps, self.finish_seqs
        pos = self.finish_heap_size
        self.finish_heap_size += 1
        while pos > 0:
            parent = (pos - 1) >> 1
            if steps[parent] <= finish_at:
                break
            steps[pos] = steps[parent]
            seqs[pos] = seqs[parent]
            pos = parent
        steps[pos] = finish_at
        seqs[pos] = seq

    def _pop_finish(self) -> int:
        """Remove the finish heap's first entry (the least finish, then the least push number); returns its push
        number."""
        steps, seqs = self.finish_steps, self.finish_seqs
        top = seqs[0]
        size = self.finish_heap_size - 1
        self.finish_heap_size = size
        finish_at, seq = steps[size], seqs[size]  # the last entry sifts down from the root
        pos = 0
        child = 1
        while child < size:
            if child + 1 < size and (
                steps[child + 1] < steps[child]
                or (steps[child + 1] == steps[child] and seqs[child + 1] < seqs[child])
            ):
                child += 1
            if finish_at < steps[child] or (finish_at == steps[child] and seq < seqs[child]):
                break
            steps[pos] = steps[child]
            seqs[pos] = seqs[child]
            pos = child
            child = 2 * pos + 1
        if size:
            steps[pos] = finish_at
            seqs[pos] = seq
        return top

    def _grow_finish_heap(self) -> None:
        size = self.finish_heap_size
        steps, seqs = _zeros(2 * size), _zeros(2 * size)
        # Not slice assignment: a C loop in the compiled core, where a memoryview slice copies generically.
        for i in range(size):
            steps[i] = self.finish_steps[i]
            seqs[i] = self.finish_seqs[i]
        self.finish_steps, self.finish_seqs = steps, seqs

    def _to_explicit(self, request: _Request) -> None:
        request.num_computed_tokens = request.decode_base + self.decode_steps
        # The decode invariant: every computed token but the last sampled one.
        request.num_output_tokens = request.num_computed_tokens - request.num_prompt_tokens + 1
        request.implicit_decoder = False
        if self.record_steps:
            del self.implicit_tokens[request.request_id]
        if self.caching:
            # It cached every full block at the step that filled it (its blocks past the prompt are private).
            request.num_cached_blocks = request.num_computed_tokens // self.block_size
            last_step = self.num_steps - 1
            if (
                self.async_scheduling
                and self.last_decode_step == last_step
                and request.implicit_stamp <= last_step
            ):
                # It decoded in the last step, and in the one before (implicit decoders run every step).
                request.prev_run_step = last_step - 1
                request.last_run_step = last_step
                request.last_run_decode = request.last_run_sampled = True
        self.num_implicit_decoders -= 1
        self.sum_decode_base -= request.decode_base
        self.decode_base_residues[request.decode_base % self.block_size] -= 1
        if self.admit_future_peak:
            index = _peak_place(self.peak_order, request)
            while self.peak_order[index] is not request:  # past the decoders of the same key
                index += 1
            self.peak_order.pop(index)  # see `_remove`

    def _num_computed_tokens(self, request: _Request) -> int:
        if request.implicit_decoder:
            return request.decode_base + self.decode_steps
        return request.num_computed_tokens

    def _num_output_tokens(self, request: _Request) -> int:
        if request.implicit_decoder:
            return request.decode_base + self.decode_steps - request.num_prompt_tokens + 1
        return request.num_output_tokens

    def _is_decoding(self, request: _Request) -> bool:
        return request.implicit_decoder or (
            request.num_output_tokens > 0
            and request.num_computed_tokens == request.num_prompt_tokens + request.num_output_tokens - 1
        )

    # ---- queue operations ----------------------------------------------------------------------------------

    def _preempt_request(self, request: _Request, num_unrun_tokens: int = 0) -> None:
        """Recompute preemption: drop all KV; the request goes back to the front of the waiting queue.
        `num_unrun_tokens` of its computed tokens were only allocated this step, never run (a priority victim
        unscheduled under prefix caching): they are not KV it loses."""
        if request.implicit_decoder:
            self._to_explicit(request)
        if self.caching:
            self.num_used_blocks -= self._free_cached_blocks(request, preempted=True)
        else:
            self.num_used_blocks -= cdiv(request.num_computed_tokens, self.block_size)
        request.record.preemptions += 1
        self.admission_blocked = False
        if request.finishing:
            # Its last token is in flight: it finishes from the waiting queue when that output is processed.
            request.finishing = False
            _remove(self.finishing, request)
            self.num_reserved_blocks -= request.num_reserved_blocks
            return
        request.record.recomputed_tokens += request.num_computed_tokens
        request.dropped_kv = max(request.dropped_kv, request.num_computed_tokens - num_unrun_tokens)
        request.num_computed_tokens = 0
        self.waiting.prepend_request(request)

    def _free_request(self, request: _Request) -> None:
        if self.caching:
            if request.implicit_decoder:
                self._to_explicit(request)
            self.num_used_blocks -= self._free_cached_blocks(request)
            return
        self.num_used_blocks -= cdiv(self._num_computed_tokens(request), self.block_size)
        self.num_reserved_blocks -= request.num_reserved_blocks
        if request.implicit_decoder:
            self._to_explicit(request)

    # ---- prefix caching (vLLM's KVCacheManager over solver.kv_cache.BlockPool) -----------------------------

    def _free_cached_blocks(self, request: _Request, preempted: bool = False) -> int:
        """vLLM's `free`: the (explicit) request's blocks are released in reverse, so that its tail is evicted
        first: the block without a hash goes to the front of the free queue, cached blocks nobody else holds
        to its back. Returns how many blocks became free."""
        if (
            preempted
            and self.async_scheduling
            and request.last_run_step == self.num_steps - 1
            and request.last_run_decode
            and request.prev_run_step == request.last_run_step - 1
        ):
            # The token it computed last step was sampled the step before, whose output was processed only
            # after last step's caching, and a victim's own output is never cached (AsyncScheduler's
            # `_update_request_with_output`): the block that token filled has no hash. A finished request's
            # last output caches all it computed.
            request.num_cached_blocks = min(
                request.num_cached_blocks, (request.num_computed_tokens - 1) // self.block_size
            )
        pool = self.block_pool
        if pool.num_queued_blocks > self.num_usable_blocks - self.num_used_blocks:
            pool.evict_to(self.num_usable_blocks - self.num_used_blocks)  # allocations so far came first
        num_cached_blocks = request.num_cached_blocks
        held_blocks = request.held_blocks
        if not preempted and request.output_block_hashes and num_blocks(held_blocks) < num_cached_blocks:
            # It finished: the blocks its output filled, private so far, are cached under the hashes its finish
            # published (a later prompt holding that output, a chat's next turn, hits them, as in vLLM).
            block_hashes = request.block_hashes + request.output_block_hashes
            pool.cache_full_blocks(held_blocks, block_hashes, min(num_cached_blocks, len(block_hashes)))
        num_held = num_blocks(held_blocks)
        num_freed = cdiv(request.num_computed_tokens, self.block_size) - num_held
        if num_cached_blocks > num_held:
            # Past num_tokens - 1 (a priority victim's blocks cached for the step it lost) no resume hits.
            reachable = max(
                (request.num_prompt_tokens + request.num_output_tokens - 1) // self.block_size, num_held
            )
            if num_cached_blocks > reachable:
                pool.free_private_run(reachable, num_cached_blocks)
            if reachable > num_held:
                request.private_run = pool.free_private_run(num_held, min(num_cached_blocks, reachable))
        num_freed += pool.free_blocks(held_blocks)
        request.held_blocks = []
        request.num_cached_blocks = 0
        return num_freed

    def _cache_blocks(self, request: _Request, num_tokens: int) -> None:
        """vLLM's `cache_blocks` at allocation: the request's blocks full once `num_tokens` are computed get
        their hash. Those with a published hash join the cache now (others may hit them at once); private
        ones are only counted (see solver.kv_cache)."""
        num_full_blocks = num_tokens // self.block_size
        if num_full_blocks <= request.num_cached_blocks:
            return
        held_blocks = request.held_blocks
        block_hashes = request.block_hashes
        if block_hashes:  # one run for the blocks this step fills (see solver.kv_cache)
            self.block_pool.cache_full_blocks(
                held_blocks, block_hashes, min(num_full_blocks, len(block_hashes))
            )
        request.num_cached_blocks = num_full_blocks

    def _find_longest_cache_hit(self, request: _Request, num_tokens: int) -> tuple[list[HeldEntry], int, int]:
        """vLLM's `get_computed_blocks`: the cached full blocks of its prefix, at most num_tokens - 1 tokens
        (the last token is always computed, to sample from): the blocks with a published hash, how many of its
        own private blocks from before a preemption follow them, and how many of the hit blocks another request
        holds (those cost no free block)."""
        if not request.block_hashes and request.private_run is None:
            return _NO_HIT  # nothing of it can be cached
        pool = self.block_pool
        memo = request.hit_memo
        if memo is not None and memo[0] == pool.version and memo[1] == num_tokens:
            return memo[2]
        max_num_blocks = (num_tokens - 1) // self.block_size
        block_hashes = request.block_hashes
        hit = pool.find_longest_cache_hit(block_hashes, max_num_blocks) if block_hashes else []
        num_held_hit_blocks = num_held_blocks(hit) if hit else 0
        num_hit_blocks = num_blocks(hit) if hit else 0
        run = request.private_run
        num_private_hits = 0
        if run is not None and num_hit_blocks == len(block_hashes) and run.lo == num_hit_blocks:
            num_private_hits = max(min(run.hi, max_num_blocks) - run.lo, 0)
        result = (hit, num_private_hits, num_held_hit_blocks)
        request.hit_memo = (pool.version, num_tokens, result)
        return result

    def _admission_fits_cached(
        self, request: _Request, num_new_tokens: int, num_computed_tokens: int, num_held_hit_blocks: int
    ) -> bool:
        """vLLM's `allocate_slots` checks under prefix caching (with eviction; see Policy) for a waiting request
        whose prefix hit `num_computed_tokens`: hit blocks are not allocated again, but those nobody holds leave
        the free queue, so they count as allocations; only hits another request holds come for free."""
        watermark = self.watermark_blocks if self.running else 0
        num_free_blocks = self.num_usable_blocks - self.num_used_blocks
        if (
            self.admit_full_prompt
            and cdiv(request.num_prompt_tokens + request.num_output_tokens, self.block_size)
            - num_held_hit_blocks
            + watermark
            > num_free_blocks
        ):
            return False
        if self.admit_future_peak and not self._peak_fits(request, self.num_usable_blocks - watermark):
            return False
        return (
            cdiv(num_computed_tokens + num_new_tokens, self.block_size) - num_held_hit_blocks + watermark
            <= num_free_blocks
        )

    def _admission_fits(self, request: _Request, num_new_tokens: int, num_free_blocks: int) -> bool:
        watermark = self.watermark_blocks if self.running else 0
        if not self.eviction:
            request.num_reserved_blocks = cdiv(
                request.num_prompt_tokens + request.max_tokens - 1, self.block_size
            )
            return (
                self.num_reserved_blocks + request.num_reserved_blocks + watermark <= self.num_usable_blocks
            )
        if (
            self.admit_full_prompt
            and cdiv(request.num_prompt_tokens + request.num_output_tokens, self.block_size) + watermark
            > num_free_blocks
        ):
            return False
        if self.admit_future_peak and not self._peak_fits(request, self.num_usable_blocks - watermark):
            return False
        return cdiv(num_new_tokens, self.block_size) + watermark <= num_free_blocks

    def _peak_fits(self, candidate: _Request, limit: int) -> bool:
        """LightLLM's check: will the running requests plus `candidate` fit in `limit` blocks at their joint
        peak, if each runs to its end (output lengths are known to the simulator)? Each is counted at its full
        current sequence, as if its prefill were done."""
        block_size = self.block_size
        running = self.running
        num_jobs = len(running) + 1
        # Each job is one integer, (tokens left to grow) << _JOB_SHIFT | (tokens held now): integers sort faster
        # than pairs, in the same order (neither count is negative, and a sequence holds fewer than 2**40
        # tokens). They are C integers in the compiled core (peak_jobs, kept between calls), no Python ints.
        if len(self.peak_jobs) < num_jobs:
            self.peak_jobs = _zeros(2 * num_jobs)
        jobs = self.peak_jobs
        decode_steps = self.decode_steps
        # The candidate, at its full sequence.
        held = candidate.num_prompt_tokens + self._num_output_tokens(candidate)
        left = candidate.num_prompt_tokens + candidate.max_tokens - 1 - held
        final_tokens = held + left
        held_now = held
        least_left = left
        jobs[num_jobs - 1] = left << _JOB_SHIFT | held
        # Most checks refuse at the walk's first point (below) when every job has grown by the least growth. Where
        # the implicit decoders lead the queue (none past them), their share of that point is known without visiting
        # them: they hold sum_decode_base + n * decode_steps tokens, and none has fewer left to grow than the finish
        # heap's first entry says (each has an entry there; a stale one only lowers it). With that lower bound the
        # point is below the walk's: where it does not fit, neither does the walk's, and the walk refuses.
        num_decoders = self.num_implicit_decoders
        leading = False
        if num_decoders and self.finish_heap_size:
            leading = True
            bound_held = held + self.sum_decode_base + num_decoders * decode_steps
            bound_left = min(left, self.finish_steps[0] - decode_steps)
            for i in range(num_decoders, num_jobs - 1):
                r = running[i]
                if r.implicit_decoder:
                    leading = False
                    break
                held_explicit = r.num_prompt_tokens + max(r.num_output_tokens, 1) - 1
                bound_held += held_explicit
                bound_left = min(bound_left, r.num_prompt_tokens + r.max_tokens - 1 - held_explicit)
            if leading and cdiv(bound_held + num_jobs * bound_left, block_size) + num_jobs - 1 > limit:
                return False
        # With the decoders leading, their jobs are taken in order from `peak_order` (every decoder's job moves
        # alike with decode_steps, so their order stays), and only the others' are sorted in among them.
        num_sorted = num_decoders if leading else 0
        peak_order = self.peak_order
        for i in range(num_jobs - 1):
            r = peak_order[i] if i < num_sorted else running[i]
            if r.implicit_decoder:  # prompt + output - 1 is its computed tokens (its output is at least 1)
                held = r.decode_base + decode_steps
            else:
                held = r.num_prompt_tokens + max(r.num_output_tokens, 1) - 1
            left = r.num_prompt_tokens + r.max_tokens - 1 - held
            final_tokens += held + left
            held_now += held
            if left < least_left:
                least_left = left
            jobs[i] = left << _JOB_SHIFT | held
        # Every job at its final size at once bounds the peak from above: if that fits, so does the peak.
        if cdiv(final_tokens, block_size) + num_jobs - 1 <= limit:
            return True
        # The walk below, whose first point (every job grown by the least growth) needs no sort: where that does
        # not fit (most refusals), the walk would refuse there too.
        if cdiv(held_now + num_jobs * least_left, block_size) + num_jobs - 1 > limit:
            return False
        if not _IN_C:
            _sort_ascending_plain(jobs, num_jobs)
        elif num_sorted:
            _sort_in(jobs, num_sorted, num_jobs)
        else:
            _sort_ascending(jobs, num_jobs)
        for i in range(num_jobs):
            job = jobs[i]
            left = job >> _JOB_SHIFT
            held = job - (left << _JOB_SHIFT)
            # When the i-th shortest finishes, requests i.. have each grown by `left` tokens;
            # sum of ceil(x_j / block_size) over `live` requests <= ceil(sum x_j / block_size) + live - 1.
            live = num_jobs - i
            if cdiv(held_now + live * left, block_size) + live - 1 > limit:
                return False
            held_now -= held
        return True

    # ---- one step ------------------------------------------------------------------------------------------

    def _long_prefill_token_threshold(self) -> int:
        threshold = self.long_prefill_token_threshold
        # vLLM: when only one request is eligible there is nobody to starve, so the cap is lifted.
        return threshold if len(self.running) + self.waiting.size > 1 else 0

    def _schedule_waiting(
        self, token_budget: int, scheduled: list[_Request], long_prefill_token_threshold: int
    ) -> int:
        """vLLM's second pass: admit waiting requests in queue order; returns the token budget left. Records
        whether admission stopped for a reason that a stretch of pure decoding cannot undo (the fast-forward's
        precondition)."""
        blocked = False
        while token_budget > 0 and self.waiting.size:
            given = self.max_num_batched_tokens - token_budget  # the step's tokens so far
            if len(self.running) > self.demanded_running:
                self.demanded_running = len(self.running)
            if len(self.running) >= self.max_num_seqs:
                self._demand(given + 1, 0)  # the loop's test that some budget is left
                blocked = True
                break
            request = self.waiting.peek_request()
            # A resumed request recomputes its generated tokens too: num_tokens = prompt + output so far.
            num_tokens = request.num_prompt_tokens + request.num_output_tokens
            if self.caching:
                if self.block_pool.num_queued_blocks > self.num_usable_blocks - self.num_used_blocks:
                    self.block_pool.evict_to(self.num_usable_blocks - self.num_used_blocks)
                hit_blocks, num_private_hits, num_held_hit_blocks = self._find_longest_cache_hit(
                    request, num_tokens
                )
                num_computed_tokens = (num_blocks(hit_blocks) + num_private_hits) * self.block_size
                num_new_tokens = num_tokens - num_computed_tokens
            else:
                num_computed_tokens = 0
                num_new_tokens = num_tokens
            chunk = num_new_tokens
            if 0 < long_prefill_token_threshold < num_new_tokens:
                num_new_tokens = long_prefill_token_threshold
            self._demand(given + max(num_new_tokens, 1), chunk)
            if (
                not self.chunked_prefill
                and num_new_tokens > token_budget
                and (token_budget < self.max_num_batched_tokens or scheduled)
            ):
                # Lasting only if no prefill chunk took budget this step: a decode stretch leaves it as is.
                blocked = not scheduled
                break
            if self.chunked_prefill:
                num_new_tokens = min(num_new_tokens, token_budget)
            if not (
                self._admission_fits_cached(request, num_new_tokens, num_computed_tokens, num_held_hit_blocks)
                if self.caching
                else self._admission_fits(
                    request, num_new_tokens, self.num_usable_blocks - self.num_used_blocks
                )
            ):
                request.num_reserved_blocks = 0
                # Under prefix caching, evictions during a decode stretch shorten a hit, and so the first chunk a
                # chunk-sized admission must fit: only the full-sequence check is sure to stay unmet.
                blocked = not self.caching or self.admit_full_prompt
                break
            self.waiting.pop_request()
            self.num_reserved_blocks += request.num_reserved_blocks
            self.running.append(request)
            self.num_running_seq += 1
            request.running_seq = self.num_running_seq
            if self.caching:
                self._admit_with_hits(
                    request, hit_blocks, num_private_hits, num_computed_tokens + num_new_tokens
                )
            else:
                self.num_used_blocks += cdiv(num_new_tokens, self.block_size)
            request.scheduled_new_tokens = num_new_tokens
            request.scheduled_computed_tokens = num_computed_tokens
            scheduled.append(request)
            token_budget -= num_new_tokens
        if token_budget <= 0 and self.waiting.size:  # the loop stopped for want of budget
            self._demand(self.max_num_batched_tokens - token_budget + 1, 0)
        self.admission_blocked = blocked and not self.admit_future_peak
        return token_budget

    def _demand(self, tokens: int, chunk: int) -> None:
        """A budget test asked for `tokens` (the step's tokens so far and a request's chunk), and a threshold test
        for a chunk of `chunk` tokens: the run's demands are the most that any asked (`RunDemands`)."""
        if tokens > self.demanded_tokens:
            self.demanded_tokens = tokens
        if chunk > self.demanded_chunk:
            self.demanded_chunk = chunk

    def _admit_with_hits(
        self, request: _Request, hit_blocks: list[HeldEntry], num_private_hits: int, num_tokens: int
    ) -> None:
        """Allocate for an admitted request as vLLM does with prefix caching: touch the hit blocks, allocate
        the rest up to `num_tokens`, cache the blocks that will be full."""
        num_hit_blocks = (num_blocks(hit_blocks) if hit_blocks else 0) + num_private_hits
        num_hit_tokens = num_hit_blocks * self.block_size
        pool = self.block_pool
        self.num_used_blocks += cdiv(num_tokens, self.block_size) - num_hit_blocks
        if hit_blocks:
            self.num_used_blocks += pool.touch(hit_blocks)  # hit_blocks become its held entries
        if num_private_hits:
            pool.take_private(request.private_run, num_private_hits)  # type: ignore[arg-type]
            self.num_used_blocks += num_private_hits
        request.private_run = None  # what it did not hit stays cached, unreachable (see solver.kv_cache)
        request.hit_memo = None
        request.held_blocks = hit_blocks if hit_blocks else []
        request.num_cached_blocks = num_hit_blocks
        request.num_computed_tokens = num_hit_tokens
        record = request.record
        if record.first_scheduled != record.first_scheduled:  # NaN: its first admission
            record.num_cached_tokens = num_hit_tokens
        if num_hit_tokens and self.record_steps:
            self.step_cached_tokens[request.request_id] = num_hit_tokens
        self._cache_blocks(request, num_tokens)

    def _schedule_literal(self) -> StepPlan:
        """vLLM V1's `schedule()`, walked request by request: first the RUNNING requests (preempting from the
        tail, or the worst priority, when one cannot allocate its blocks), then the WAITING ones if nothing was
        preempted. Implicit decoders that run stay implicit; those that do not are made explicit."""
        token_budget = self.max_num_batched_tokens
        long_prefill_token_threshold = self._long_prefill_token_threshold()
        scheduled: list[_Request] = []
        # Implicit decoders scheduled: their scheduled_plan is this plan's number (and scheduled_blocks theirs).
        self.plan_serial += 1
        self.num_scheduled_decoders = 0
        preempted_reqs: list[_Request] = []
        static_admit = self.static_batching and not self.running
        self.admission_blocked = False

        if self.prefill_first and self.waiting.size:
            self._schedule_waiting(token_budget, scheduled, long_prefill_token_threshold)
            if scheduled:
                return StepPlan(scheduled, preempted_reqs, 0)  # a prefill-only step: the decoders wait

        if self.decode_first:
            decoding = [r for r in self.running if self._is_decoding(r)]
            self.running[:] = decoding + [r for r in self.running if not self._is_decoding(r)]
        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            if request.finishing:  # vLLM: its last token is in flight, nothing more to schedule
                req_index += 1
                continue
            num_computed_tokens = self._num_computed_tokens(request)
            num_tokens = request.num_prompt_tokens + self._num_output_tokens(request)
            num_new_tokens = num_tokens - num_computed_tokens
            chunk = num_new_tokens
            if 0 < long_prefill_token_threshold < num_new_tokens:
                num_new_tokens = long_prefill_token_threshold
            if num_new_tokens > 0:
                self._demand(self.max_num_batched_tokens - token_budget + num_new_tokens, chunk)
            num_new_tokens = min(num_new_tokens, token_budget)
            if num_new_tokens <= 0:
                req_index += 1
                continue
            # allocate_slots: the blocks its new tokens spill into.
            num_new_blocks = cdiv(num_computed_tokens + num_new_tokens, self.block_size) - cdiv(
                num_computed_tokens, self.block_size
            )
            while num_new_blocks > self.num_usable_blocks - self.num_used_blocks:
                if not self.eviction:
                    raise AssertionError("no-eviction admission reserved too little KV")  # an invariant
                if self.priority_order or self.least_computed_victim:
                    if self.least_computed_victim:
                        preempted_req = self._least_computed()
                    else:
                        preempted_req = _worst_priority(self.running)
                    self._note_victim(preempted_req)
                    victim_index = _index(self.running, preempted_req)
                    self.running.pop(victim_index)
                    if victim_index < req_index:
                        req_index -= 1
                    num_unscheduled = self._unschedule(preempted_req, scheduled)
                    token_budget += num_unscheduled
                    # Under prefix caching its computed tokens now count this step's, which never ran.
                    num_unrun_tokens = num_unscheduled if self.caching else 0
                else:
                    self._note_victim(self.running[-1])
                    preempted_req = self.running.pop()
                    num_unrun_tokens = 0
                self._preempt_request(preempted_req, num_unrun_tokens)
                preempted_reqs.append(preempted_req)
                if preempted_req is request:
                    break  # no more request to preempt: it cannot be scheduled
            if preempted_reqs and preempted_reqs[-1] is request:
                break
            self.num_used_blocks += num_new_blocks
            if request.implicit_decoder:
                request.scheduled_plan = self.plan_serial  # private blocks: cached lazily
                request.scheduled_blocks = num_new_blocks
                self.num_scheduled_decoders += 1
            else:
                request.scheduled_new_tokens = num_new_tokens
                request.scheduled_computed_tokens = num_computed_tokens
                scheduled.append(request)
                if self.caching:
                    self._cache_blocks(request, num_computed_tokens + num_new_tokens)
            token_budget -= num_new_tokens
            req_index += 1
        if token_budget <= 0 and req_index < len(self.running):  # the walk stopped for want of budget
            self._demand(self.max_num_batched_tokens - token_budget + 1, 0)
        self._freeze_decoders()
        if not preempted_reqs and (self.continuous_batching or static_admit):
            self._schedule_waiting(token_budget, scheduled, long_prefill_token_threshold)
        return StepPlan(scheduled, preempted_reqs, self.num_implicit_decoders)

    def _least_computed(self) -> _Request:
        """The least-computed rule's victim: the running request cheapest to recompute, the newest on a tie."""
        victim = self.running[-1]
        for index in range(len(self.running) - 2, -1, -1):
            candidate = self.running[index]
            if self._num_computed_tokens(candidate) < self._num_computed_tokens(victim):
                victim = candidate
        return victim

    def _note_victim(self, victim: _Request) -> None:
        """`victim` is about to be preempted from the running queue: record which rules would have picked it
        (`RunDemands`). A rule found to differ once is not walked again."""
        self.picked_victim = True
        if victim is not self.running[-1]:
            self.newest_victims = False
        if self.least_computed_victims and victim is not self._least_computed():
            self.least_computed_victims = False
        if self.worst_priority_victims and victim is not _worst_priority(self.running):
            self.worst_priority_victims = False

    def _unschedule(self, victim: _Request, scheduled: list[_Request]) -> int:
        """Undo a priority victim's allocation made earlier in this step; returns the tokens given back. With
        prefix caching its blocks for this step stay allocated (and cached) until its preemption frees them, as
        in vLLM, which frees a victim's whole block table."""
        if self.caching:
            return self._unschedule_cached(victim, scheduled)
        if victim.scheduled_plan == self.plan_serial:
            victim.scheduled_plan = 0
            self.num_scheduled_decoders -= 1
            self.num_used_blocks -= victim.scheduled_blocks
            return 1
        for j in range(len(scheduled)):
            if scheduled[j] is victim:
                num_new_tokens = victim.scheduled_new_tokens
                num_computed_tokens = victim.scheduled_computed_tokens
                self.num_used_blocks -= cdiv(num_computed_tokens + num_new_tokens, self.block_size) - cdiv(
                    num_computed_tokens, self.block_size
                )
                scheduled.pop(j)
                return num_new_tokens
        return 0

    def _unschedule_cached(self, victim: _Request, scheduled: list[_Request]) -> int:
        num_new_tokens = 0
        if victim.scheduled_plan == self.plan_serial:
            victim.scheduled_plan = 0
            self.num_scheduled_decoders -= 1
            self._to_explicit(victim)
            num_new_tokens = 1
        else:
            for j in range(len(scheduled)):
                if scheduled[j] is victim:
                    scheduled.pop(j)
                    num_new_tokens = victim.scheduled_new_tokens
                    break
        if num_new_tokens:
            # Its block table covers this step's tokens; the preemption frees (and counts) all of it.
            decoding = victim.num_computed_tokens == victim.num_prompt_tokens + victim.num_output_tokens - 1
            victim.num_computed_tokens += num_new_tokens
            victim.record.recomputed_tokens -= num_new_tokens
            self._cache_blocks(victim, victim.num_computed_tokens)
            if (
                self.async_scheduling
                and decoding
                and victim.last_run_step == self.num_steps - 1
                and victim.last_run_sampled
            ):
                # The token it was to compute is still in flight: vLLM cached only up to the one before.
                victim.num_cached_blocks = min(
                    victim.num_cached_blocks, (victim.num_computed_tokens - 1) // self.block_size
                )
        return num_new_tokens

    def _freeze_decoders(self) -> None:
        """Implicit decoders advance with decode_steps; those that do not run this step must leave the
        implicit set, or they would advance without running."""
        if self.num_scheduled_decoders != self.num_implicit_decoders:
            for request in self.running:
                if request.implicit_decoder and request.scheduled_plan != self.plan_serial:
                    self._to_explicit(request)

    def _step_fast(self) -> bool:
        """Schedule and run the common step in O(prefilling + admitted + preempted): every implicit decoder runs
        one token and the prefill chunks, all at the tail of the running queue, share the rest of the budget.
        Under FCFS, victims come from the tail, so vLLM's walk (preempt lazily when a request cannot allocate)
        pops exactly the victims that an eager "pop until the step's total need fits" pops: prefix needs never
        exceed the total. Returns False, having scheduled nothing, when the literal walk must decide. (It runs
        the step itself rather than return a StepPlan: this is the hot path, and building a plan object on every
        step measurably slows the replay, by some 3%.)"""
        block_size = self.block_size
        scheduled: list[_Request] = []
        long_prefill_token_threshold = self._long_prefill_token_threshold()
        if self.prefill_first and self.waiting.size:
            self._schedule_waiting(self.max_num_batched_tokens, scheduled, long_prefill_token_threshold)
            if scheduled:
                self._apply(scheduled, [], 0)  # a prefill-only step: the decoders wait
                return True
        num_decoders = self.num_implicit_decoders
        token_budget = self.max_num_batched_tokens - num_decoders
        if token_budget < 0:
            return False
        self._demand(num_decoders, 0)  # the decoders leading the queue: one token each
        # The decoders whose next token opens a new block: those with decode_base = -decode_steps mod block_size.
        num_new_blocks = self.decode_base_residues[-self.decode_steps % block_size]
        running = self.running
        # The prefilling requests, at the tail; or where some sit between decoders (a long prompt's chunks admitted
        # before a shorter prompt that has become a decoder), the whole queue, each decoder taking its token from
        # the budget in queue order, as vLLM's walk does: the chunks are the walk's as long as the budget lasts
        # past the last decoder (the literal walk decides otherwise, and under decode_first, whose walk reorders
        # the queue).
        first = num_decoders
        for index in range(num_decoders, len(running)):
            if running[index].implicit_decoder:
                if self.decode_first:
                    return False
                first = 0
                token_budget = self.max_num_batched_tokens
                break
        for index in range(first, len(running)):
            request = running[index]
            if request.implicit_decoder:  # only in a walk over the whole queue
                if token_budget <= 0:
                    return False  # it would not run
                self._demand(self.max_num_batched_tokens - token_budget + 1, 0)
                token_budget -= 1
                continue
            if request.finishing:
                continue
            if token_budget <= 0:
                self._demand(self.max_num_batched_tokens - token_budget + 1, 0)
                continue  # keep checking the order; vLLM's walk stops here
            num_computed_tokens = request.num_computed_tokens
            num_new_tokens = request.num_prompt_tokens + request.num_output_tokens - num_computed_tokens
            chunk = num_new_tokens
            if 0 < long_prefill_token_threshold < num_new_tokens:
                num_new_tokens = long_prefill_token_threshold
            self._demand(self.max_num_batched_tokens - token_budget + num_new_tokens, chunk)
            num_new_tokens = min(num_new_tokens, token_budget)
            blocks = cdiv(num_computed_tokens + num_new_tokens, block_size) - cdiv(
                num_computed_tokens, block_size
            )
            request.scheduled_new_tokens = num_new_tokens
            request.scheduled_computed_tokens = num_computed_tokens
            scheduled.append(request)
            num_new_blocks += blocks
            token_budget -= num_new_tokens
        preempted_reqs = _NO_REQUESTS
        if num_new_blocks > self.num_usable_blocks - self.num_used_blocks:
            if self.priority_order or not self.eviction or self.least_computed_victim or self.caching:
                # Priority victims are not at the tail. Under prefix caching the order matters too: vLLM's walk
                # allocates for the requests ahead of a victim before it frees the victim, so those allocations
                # evict cached free blocks that an eager "free first" would spare. The literal walk decides.
                return False
            preempted_reqs = []
            while num_new_blocks > self.num_usable_blocks - self.num_used_blocks:
                # The k-th victim of vLLM's walk, which the other rules would pick from this same queue.
                self._note_victim(self.running[-1])
                preempted_req = self.running.pop()
                if scheduled and scheduled[-1] is preempted_req:
                    scheduled.pop()
                    num_new_tokens = preempted_req.scheduled_new_tokens
                    num_computed_tokens = preempted_req.scheduled_computed_tokens
                    num_new_blocks -= cdiv(num_computed_tokens + num_new_tokens, block_size) - cdiv(
                        num_computed_tokens, block_size
                    )  # the blocks its chunk would have taken
                elif (
                    preempted_req.implicit_decoder
                    and (preempted_req.decode_base + self.decode_steps) % block_size == 0
                ):
                    num_new_blocks -= 1  # it would have opened a block
                self._preempt_request(preempted_req)
                preempted_reqs.append(preempted_req)
        self.num_used_blocks += num_new_blocks
        if self.caching:
            for request in scheduled:
                self._cache_blocks(request, request.scheduled_computed_tokens + request.scheduled_new_tokens)
        if not preempted_reqs and (self.continuous_batching or (self.static_batching and not self.running)):
            self._schedule_waiting(token_budget, scheduled, long_prefill_token_threshold)
        num_decoders = self.num_implicit_decoders
        if not (scheduled or preempted_reqs or num_decoders):
            return False  # nothing to run: the literal walk decides
        self._apply(scheduled, preempted_reqs, num_decoders)
        return True

    def _apply(self, scheduled: list[_Request], preempted_reqs: list[_Request], num_decoders: int) -> None:
        """Run a scheduled step: charge its time, advance tokens, emit tokens, finish requests. `num_decoders`
        implicit decoders run one token each (all of them, or none in a prefill-only step)."""
        num_scheduled_tokens = num_decoders
        # KV tokens attended: each implicit decoder attends decode_base + decode_steps + 1 after this step.
        kv_tokens = self.sum_decode_base + num_decoders * (self.decode_steps + 1) if num_decoders else 0
        attention_pairs = 0
        recomputing = False
        for request in scheduled:
            num_new_tokens = request.scheduled_new_tokens
            num_computed_tokens = request.scheduled_computed_tokens
            num_scheduled_tokens += num_new_tokens
            kv_tokens += num_computed_tokens + num_new_tokens
            if num_new_tokens > 1:
                attention_pairs += num_new_tokens * (num_computed_tokens + num_new_tokens)
            if num_computed_tokens < request.dropped_kv:  # below the KV a preemption dropped
                recomputing = True
        if num_scheduled_tokens == 0:
            return
        start = self.now
        duration = (
            self.step_ps
            + self.token_ps * num_scheduled_tokens
            + self.kv_token_ps * kv_tokens
            + self.attention_pair_ps * attention_pairs
            + self.request_ps * (num_decoders + len(scheduled))
        )
        self.now += duration
        self.busy_ps += duration
        if recomputing:  # priced apart, so that a step without recomputation costs no more than before
            self.recompute_ps += self._recompute_tax(scheduled, num_decoders, duration)
        self.num_tokens_processed += num_scheduled_tokens
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        if self.record_steps:
            self._log_step(start, duration, scheduled, num_decoders, preempted_reqs)
        step = self.num_steps
        self.num_steps += 1
        if num_decoders:
            self.decode_steps += 1  # the implicit decoders advance one token
            self.last_decode_step = step
        if self.finishing:  # async: the previous step's output is processed after this step was scheduled
            self._free_finishing()
        end_s = None  # the step's end in seconds, computed when a record needs it
        # A list only once a request finishes: most steps finish none.
        finished: list[_Request] | None = None
        track_runs = self.async_scheduling and self.caching
        for request in scheduled:
            num_new_tokens = request.scheduled_new_tokens
            num_computed_tokens = request.scheduled_computed_tokens
            record = request.record
            if not request.ever_scheduled:  # a C field, where the record's NaN is a Python attribute
                request.ever_scheduled = True
                _slot_set(record, _RECORD_FIRST_SCHEDULED, _seconds(start))
            if track_runs:
                request.prev_run_step = request.last_run_step
                request.last_run_step = step
                # It computes the token its previous run sampled (not a prefill's 1-token last chunk).
                request.last_run_decode = request.last_run_sampled and (
                    num_computed_tokens == request.num_prompt_tokens + request.num_output_tokens - 1
                )
                request.last_run_sampled = (
                    num_computed_tokens + num_new_tokens
                    == request.num_prompt_tokens + request.num_output_tokens
                )
            request.num_computed_tokens += num_new_tokens
            # The chunk reached the end of num_tokens: a token is sampled.
            if request.num_computed_tokens == request.num_prompt_tokens + request.num_output_tokens:
                request.num_output_tokens += 1
                if request.num_output_tokens == 1:
                    if end_s is None:
                        end_s = _seconds(self.now)
                    _slot_set(record, _RECORD_FIRST_TOKEN, end_s)
                if request.num_output_tokens == request.max_tokens:
                    if finished is None:
                        finished = []
                    finished.append(request)
                else:
                    self._to_implicit(request)
        if self.next_finish <= self.decode_steps:
            while self.finish_heap_size and self.finish_steps[0] <= self.decode_steps:
                seq = self._pop_finish()
                request = self.finish_heap_requests[seq]
                if request.finish_seq == seq and request.implicit_decoder:
                    if finished is None:
                        finished = []
                    finished.append(request)
            self.next_finish = self.finish_steps[0] if self.finish_heap_size else _NEVER
        if finished:
            self._finish_requests(finished, _seconds(self.now) if end_s is None else end_s)

    def _recompute_tax(self, scheduled: list[_Request], num_decoders: int, duration: int) -> int:
        """The recompute tax of the step about to run (before its decoders advance), in picoseconds: its
        `duration` minus the time of the same step without its recomputation (`without_recompute`, request by
        request, without building its lists), on the same integer cost model as `_apply`. Implicit decoders never
        recompute (they decode past all they held), so they stay in the step as they are."""
        num_tokens = num_requests = num_decoders
        kv_tokens = self.sum_decode_base + num_decoders * (self.decode_steps + 1) if num_decoders else 0
        attention_pairs = 0
        for request in scheduled:
            num_new_tokens = request.scheduled_new_tokens
            num_computed_tokens = request.scheduled_computed_tokens
            if num_computed_tokens < request.dropped_kv:  # only KV below what a preemption dropped is redone
                num_new_tokens, num_computed_tokens = request_without_recompute(
                    num_new_tokens,
                    num_computed_tokens,
                    recomputed_tokens(num_computed_tokens, num_new_tokens, request.dropped_kv),
                )
            if num_new_tokens == 0:  # all of its work was recomputation: not in the step at all
                continue
            num_tokens += num_new_tokens
            num_requests += 1
            kv_tokens += num_computed_tokens + num_new_tokens
            if num_new_tokens > 1:
                attention_pairs += num_new_tokens * (num_computed_tokens + num_new_tokens)
        if num_tokens == 0:
            return duration  # nothing left: the whole step was recomputation
        without_ps = (
            self.step_ps
            + self.token_ps * num_tokens
            + self.kv_token_ps * kv_tokens
            + self.attention_pair_ps * attention_pairs
            + self.request_ps * num_requests
        )
        return max(duration - without_ps, 0)

    def _free_finishing(self) -> None:
        finishing = self.finishing
        self.finishing = []
        for request in finishing:
            request.finishing = False
        self._finish_requests(finishing, None)

    def _finish_requests(self, finished: list[_Request], end_s: float | None) -> None:
        """Requests whose last token the step ending at `end_s` produced: freed, in the order vLLM processes
        the step's output (the running queue's); under async scheduling only one step later (`finishing`)."""
        if end_s is not None:
            for request in finished:
                _slot_set(request.record, _RECORD_FINISH, end_s)
            if self.async_scheduling:
                for request in finished:
                    if request.implicit_decoder:
                        self._to_explicit(request)
                    request.finishing = True
                self.finishing.extend(finished)
                return
        if self.caching and len(finished) > 1:
            if self.decode_first:  # the running queue was reordered
                _sort_by_place(finished, self.running)
            else:
                finished.sort(key=_running_seq)
        for request in finished:
            self._free_request(request)
        if len(finished) > 8:
            for request in finished:
                request.freed = True
            # The others, in their order: a test of a C field each, where a set of id()s cost a Python int each.
            running = []
            for request in self.running:
                if not request.freed:
                    running.append(request)
            self.running = running
        elif self.decode_first:  # the running queue was reordered
            for request in finished:
                _remove(self.running, request)
        else:
            for request in finished:
                _remove_in_seq_order(self.running, request)
        self.admission_blocked = False

    def _log_step(
        self,
        start: int,
        duration: int,
        scheduled: list[_Request],
        num_decoders: int,
        preempted_reqs: list[_Request],
    ) -> None:
        num_scheduled_tokens = self.implicit_tokens.copy() if num_decoders else {}
        for request in scheduled:
            num_scheduled_tokens[request.request_id] = request.scheduled_new_tokens
        self.step_log.append(
            _new_step(
                self.num_steps,
                _seconds(start),
                _seconds(duration),
                num_scheduled_tokens,
                tuple([request.request_id for request in preempted_reqs]),
                self.num_used_blocks,
                self.step_cached_tokens,
            )
        )
        self.step_cached_tokens = {}

    # ---- closed-form decode stretches ----------------------------------------------------------------------

    def _decode_blocks_over(self, num_steps: int) -> int:
        """Blocks the implicit decoders allocate over the next `num_steps` steps: each crosses a block boundary
        every block_size steps, and in the first num_steps mod block_size steps only those whose residue comes
        up do."""
        block_size = self.block_size
        full_cycles, rest = divmod(num_steps, block_size)
        total = full_cycles * self.num_implicit_decoders
        if rest:
            # Residues crossing within `rest` steps: (-decode_steps - o) mod block_size for o < rest, a circular
            # range ending at -decode_steps mod block_size.
            end = -self.decode_steps % block_size
            first = end - rest + 1
            residues = self.decode_base_residues
            if first < 0:  # the range wraps around: block_size + first .. block_size - 1 first
                for residue in range(block_size + first, block_size):
                    total += residues[residue]
                first = 0
            for residue in range(first, end + 1):  # not sum() over slices: C integers in the compiled core
                total += residues[residue]
        return total

    def _fast_forward(self, next_arrival_time: int | None, next_arrival_step: int | None) -> bool:
        """Advance k >= 1 pure-decode steps at once when nothing but decoding can happen. Returns True if it did."""
        num_decoders = self.num_implicit_decoders
        if (
            num_decoders == 0
            or num_decoders != len(self.running)
            or num_decoders > self.max_num_batched_tokens
        ):
            return False
        static_full = self.static_batching  # running is non-empty here: a static batch admits nothing
        if self.waiting.size and not (self.admission_blocked or static_full):
            return False
        # Steps until the next finish; a stale heap entry can only make the stretch shorter, never wrong.
        k = max(self.next_finish - self.decode_steps, 1) if self.finish_heap_size else 1
        # Step j of the stretch lasts first_step_ps + slope_ps * j: each step reads num_decoders more KV tokens.
        first_step_ps = (
            self.step_ps
            + (self.token_ps + self.request_ps) * num_decoders
            + self.kv_token_ps * (self.sum_decode_base + num_decoders * self.decode_steps + num_decoders)
        )
        slope_ps = self.kv_token_ps * num_decoders
        if next_arrival_step is not None:
            k = min(k, next_arrival_step - self.num_steps)
        k = min(k, self.max_steps - self.num_steps)  # a run cut short stops where it was asked to
        if next_arrival_time is not None:
            gap = next_arrival_time  # a C integer before the subtraction (in the compiled core)
            gap -= self.now
            if (k - 1) * first_step_ps + slope_ps * (k - 1) * (k - 2) // 2 >= gap:  # the arrival comes first
                k = _steps_starting_before(gap, first_step_ps, slope_ps)
        if k < 1:
            return False
        num_free_blocks = self.num_usable_blocks - self.num_used_blocks
        if (
            num_decoders * cdiv(k, self.block_size) > num_free_blocks
            and self._decode_blocks_over(k) > num_free_blocks
        ):
            lo, hi = 0, k  # the largest k whose allocations all fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._decode_blocks_over(mid) <= num_free_blocks:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k < 1:
                return False
        self._demand(num_decoders, 0)
        if self.waiting.size and not static_full:
            # Each step of the stretch tests the waiting queue's head again: the sequence cap, then the budget for
            # at most its whole sequence so far on top of the decoders' tokens.
            if num_decoders > self.demanded_running:
                self.demanded_running = num_decoders
            head = self.waiting.peek_request()
            sequence = head.num_prompt_tokens + head.num_output_tokens
            self._demand(num_decoders + sequence, sequence)
        num_new_blocks = self._decode_blocks_over(k)
        total_ps = k * first_step_ps + slope_ps * k * (k - 1) // 2
        if self.record_steps:
            num_scheduled_tokens = self.implicit_tokens  # every running request decodes implicitly
            for j in range(k):
                self.step_log.append(
                    _new_step(
                        self.num_steps + j,
                        _seconds(self.now + j * first_step_ps + slope_ps * j * (j - 1) // 2),
                        _seconds(first_step_ps + slope_ps * j),
                        num_scheduled_tokens.copy(),
                        (),
                        self.num_used_blocks + self._decode_blocks_over(j + 1),
                        {},
                    )
                )
        self.num_used_blocks += num_new_blocks
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        self.now += total_ps
        self.busy_ps += total_ps
        self.num_tokens_processed += num_decoders * k
        self.num_steps += k
        self.decode_steps += k
        self.last_decode_step = self.num_steps - 1
        end_s = _seconds(self.now)
        finished = []
        if self.next_finish <= self.decode_steps:
            while self.finish_heap_size and self.finish_steps[0] <= self.decode_steps:
                seq = self._pop_finish()
                request = self.finish_heap_requests[seq]
                if request.finish_seq == seq and request.implicit_decoder:
                    request.num_output_tokens = request.max_tokens
                    finished.append(request)
            self.next_finish = self.finish_steps[0] if self.finish_heap_size else _NEVER
        if finished:
            self._finish_requests(finished, end_s)
        return True


_THRASH_FACTOR = 100  # see Simulator.run
_JOB_SHIFT = 40  # LightLLM's check packs (tokens left, tokens held) into one int: see Simulator._peak_fits
_NEVER = 0x4000_0000_0000_0000  # 2**62: a finish no replay reaches (Simulator.next_finish)
_NO_HIT: tuple[list[HeldEntry], int, int] = ([], 0, 0)  # never mutated: an admission takes a fresh list
_NO_REQUESTS: list[_Request] = []  # never mutated: a step's preemptions, where it has none


# Below 2**53 picoseconds (2.5 hours) a time and PS_PER_S are both exact doubles, and one IEEE division rounds
# correctly, as Python's int / int does: the same float, divided in C in the compiled core.
_EXACT_PS = 0x20_0000_0000_0000  # 2**53


def _seconds(ps: int) -> float:
    """`ps / PS_PER_S`, the time `ps` in seconds."""
    if -_EXACT_PS < ps < _EXACT_PS:
        return ps / 1e12
    return ps / PS_PER_S


def _zeros(n: int) -> array:
    """`n` zeros as C 64-bit integers."""
    return array("q", bytes(8 * n))


def _sort_ascending(values: array, n: int) -> None:
    """Sort `values[:n]` in place: a heapsort, for the compiled core, where it runs over C integers (in plain
    Python `_sort_ascending_plain`, list.sort in C, is faster). Integers have one sorted order: both give it."""
    start = n // 2
    end = n
    while end > 1:
        if start > 0:  # building the max-heap: sift values[start] down
            start -= 1
            root = start
        else:  # the heap's largest goes behind it; its last sifts down from the root
            end -= 1
            value = values[end]
            values[end] = values[0]
            values[0] = value
            root = 0
        value = values[root]
        child = 2 * root + 1
        while child < end:
            if child + 1 < end and values[child + 1] > values[child]:
                child += 1
            if values[child] <= value:
                break
            values[root] = values[child]
            root = child
            child = 2 * root + 1
        values[root] = value


def _sort_ascending_plain(values: array, n: int) -> None:
    values[:n] = array("q", sorted(values[:n]))


def _peak_before(a: _Request, b: _Request) -> bool:
    """Whether implicit decoder `a`'s job in LightLLM's check sorts before `b`'s at every decode_steps: its
    tokens left to grow, prompt + max_tokens - 1 - decode_base - decode_steps, then its tokens held,
    decode_base + decode_steps."""
    a_finish = a.num_prompt_tokens + a.max_tokens - a.decode_base
    b_finish = b.num_prompt_tokens + b.max_tokens - b.decode_base
    return a_finish < b_finish or (a_finish == b_finish and a.decode_base < b.decode_base)


def _peak_place(order: list[_Request], request: _Request) -> int:
    """The first place in `order` (sorted by `_peak_before`) whose decoder does not sort before `request`."""
    lo = 0
    hi = len(order)
    while lo < hi:
        mid = (lo + hi) >> 1
        if _peak_before(order[mid], request):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _sort_in(values: array, start: int, n: int) -> None:
    """Sort `values[:n]` in place where `values[:start]` is sorted: the rest inserted one by one (a few jobs
    into LightLLM's sorted decoders; C integers in the compiled core)."""
    for i in range(start, n):
        value = values[i]
        j = i
        while j > 0 and values[j - 1] > value:
            values[j] = values[j - 1]
            j -= 1
        values[j] = value


def _worst_priority(running: list[_Request]) -> _Request:
    """`max(running, key=lambda r: (r.priority, r.arrival_time))`, the first such on a tie: the priority
    policy's victim (a walk over C fields in the compiled core, where max's key tuples cost most of a step)."""
    worst = running[0]
    for index in range(1, len(running)):
        r = running[index]
        if r.priority > worst.priority or (
            r.priority == worst.priority and r.arrival_time > worst.arrival_time
        ):
            worst = r
    return worst


def _index(requests: list[_Request], request: _Request) -> int:
    """`requests.index(request)` by identity: list.index tests each element with ==, several calls apiece for
    these objects, where the compiled core compares pointers."""
    for index in range(len(requests)):
        if requests[index] is request:
            return index
    raise ValueError(f"request {request.request_id} is not in the list")


def _remove(requests: list[_Request], request: _Request) -> None:
    """`requests.remove(request)` by identity (`_index`)."""
    # Not `del`: in the compiled core list.pop is a memmove, where `del` goes through list slicing.
    requests.pop(_index(requests, request))


def _remove_in_seq_order(requests: list[_Request], request: _Request) -> None:
    """`_remove(requests, request)` where `requests` is in running_seq order, as the running queue is but under
    decode_first (it appends each request with the next number, and its removals keep the order): found by
    bisection, not a scan (a scan of the running queue per finished request cost a fifteenth of a replay). Where
    the request is not at its place, the scan finds it."""
    seq = request.running_seq
    lo = 0
    hi = len(requests)
    while lo < hi:
        mid = (lo + hi) >> 1
        r = requests[mid]  # a C struct's field in the compiled core, not an attribute lookup
        if r.running_seq < seq:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(requests) and requests[lo] is request:
        requests.pop(lo)  # see `_remove`
    else:
        _remove(requests, request)


def _running_seq(request: _Request) -> int:
    return request.running_seq


def _sort_by_place(requests: list[_Request], running: list[_Request]) -> None:
    """Sort `requests` by their places in `running`. A function of its own: its key's closure, in
    `Simulator._finish_requests`, cost a closure object at every call there, sorting or not."""
    position = {id(r): i for i, r in enumerate(running)}
    requests.sort(key=lambda r: position[id(r)])


def _steps_starting_before(gap: int, first_step: int, slope: int) -> int:
    """How many steps start before `gap` when step j lasts first_step + slope*j: the count of j >= 0 with
    j*first_step + slope*j*(j-1)/2 < gap. A float estimate, corrected with exact integer arithmetic."""
    if slope:
        half = first_step - slope / 2
        # 2 * slope * gap as a float: while both factors are exact doubles, their product as doubles rounds as
        # the exact integer does (so the compiled core multiplies C doubles).
        exact = 2 * slope < _EXACT_PS and -_EXACT_PS < gap < _EXACT_PS
        area = 2.0 * slope * gap if exact else float(2 * slope * gap)
        j = int((-half + _sqrt(half * half + area)) / slope) + 2
    else:
        j = gap // first_step + 2 if first_step else 0
    while j > 0 and j * first_step + slope * j * (j - 1) // 2 >= gap:
        j -= 1
    return j + 1


def _new_request(
    r: RequestArrival, index: int, order: str, block_size: int, num_usable_blocks: int
) -> _Request:
    """The simulator's request for the arrival `r` (the `index`-th of the replay), with its record. Each field of
    the arrival read once, off its slot (`_slot_get`): this runs for every request of a replay."""
    request_id = _slot_get(r, _ARRIVAL_REQUEST_ID)
    prompt_tokens = _slot_get(r, _ARRIVAL_PROMPT_TOKENS)
    output_tokens = _slot_get(r, _ARRIVAL_OUTPUT_TOKENS)
    if output_tokens is None or output_tokens < 1:
        raise ValueError(f"request {request_id}: output_tokens must be known and >= 1 to simulate")
    if prompt_tokens < 1:
        raise ValueError(f"request {request_id}: prompt_tokens must be >= 1")
    # C integers in the compiled core (the record keeps the arrival's own ints).
    num_prompt_tokens = prompt_tokens
    max_tokens = output_tokens
    if cdiv(num_prompt_tokens + max_tokens - 1, block_size) > num_usable_blocks:
        raise ValueError(
            f"request {request_id}: {prompt_tokens}+{output_tokens} tokens can never fit in "
            f"{num_usable_blocks} KV blocks of {block_size} tokens"
        )
    arrival_time = _to_ps(_slot_get(r, _ARRIVAL_TIME))
    priority = _slot_get(r, _ARRIVAL_PRIORITY)
    # The record's arrival is on the simulator's picosecond clock, so latencies are never negative.
    record = _new_record(request_id, _seconds(arrival_time), prompt_tokens, output_tokens, priority)
    block_hashes, output_block_hashes = _slot_get(r, _ARRIVAL_BLOCK_HASHES), ()
    num_prompt_blocks = num_prompt_tokens // block_size
    if len(block_hashes) > num_prompt_blocks:
        # Past its prompt's, the hashes of its generated blocks (from its finish), used when it finishes.
        block_hashes, output_block_hashes = (
            block_hashes[:num_prompt_blocks],
            block_hashes[num_prompt_blocks:],
        )
    queue_order = 0
    queue_key = None  # the FCFS queue is a list in arrival order
    if order != "fcfs":
        queue_order = (
            priority if order == "priority" else prompt_tokens if order == "prompt" else output_tokens
        )
        queue_key = (queue_order, arrival_time, index)
    request = _Request.__new__(_Request)
    request._init(
        request_id,
        arrival_time,
        num_prompt_tokens,
        max_tokens,
        queue_key,
        record,
        block_hashes,
        output_block_hashes,
    )
    request.queue_order = queue_order
    request.queue_index = index
    request.priority = priority
    return request


# A slot of a __slots__ class, by its member descriptor: `_slot_get` and `_slot_set` read and set it as the
# descriptor does, in the compiled core straight at its offset in the object (C functions declared in
# _simulator_compiled.pxd), without an attribute lookup; on an object of another class, by its name.
if not cython.compiled:

    def _slot_get(obj: object, slot: MemberDescriptorType) -> object:
        return getattr(obj, slot.__name__)

    def _slot_set(obj: object, slot: MemberDescriptorType, value: object) -> None:
        setattr(obj, slot.__name__, value)

    def _slots_set(obj: object, slots: tuple, start: int, values: tuple) -> None:
        """`_slot_set` of each of `values` into the slots from `slots[start]` on (one C loop in the compiled
        core)."""
        for index in range(len(values)):
            _slot_set(obj, slots[start + index], values[index])

    def _new_bare(cls: type) -> object:
        """An instance of `cls` without its `__init__`: every slot empty."""
        return cls.__new__(cls)

    def _untrack(obj: object) -> None:
        """The compiled core's `PyObject_GC_UnTrack`: the cyclic collector stops walking `obj`."""

    _sqrt = math.sqrt  # C's sqrt in the compiled core (the one math.sqrt calls: the same double)


def _slot(cls: type, name: str) -> MemberDescriptorType:
    """The member descriptor of `cls`'s slot `name` (an object slot, as every __slots__ name's is)."""
    slot = cls.__dict__.get(name)
    if type(slot) is not MemberDescriptorType or name not in cls.__slots__:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    return slot  # type: ignore[return-value]


_ARRIVAL_REQUEST_ID = _slot(RequestArrival, "request_id")
_ARRIVAL_TIME = _slot(RequestArrival, "time")
_ARRIVAL_PROMPT_TOKENS = _slot(RequestArrival, "prompt_tokens")
_ARRIVAL_OUTPUT_TOKENS = _slot(RequestArrival, "output_tokens")
_ARRIVAL_PRIORITY = _slot(RequestArrival, "priority")
_ARRIVAL_BLOCK_HASHES = _slot(RequestArrival, "block_hashes")
_RUNNING_REQUEST = _slot(RunningRequest, "request")
_RUNNING_COMPUTED_TOKENS = _slot(RunningRequest, "computed_tokens")
_RUNNING_GENERATED_TOKENS = _slot(RunningRequest, "generated_tokens")
_RUNNING_FINISHING = _slot(RunningRequest, "finishing")
_RUNNING_DECODED_IN_FLIGHT = _slot(RunningRequest, "decoded_in_flight")


def _record_slots() -> tuple[tuple, tuple]:
    """RequestRecord's slots in field order, and the defaults of all but the first five (the arguments
    `_new_record` takes), which its `__init__` would set: what `_new_record` sets instead."""
    names = [f.name for f in fields(RequestRecord)]
    if names[:5] != ["request_id", "arrival", "prompt_tokens", "output_tokens", "priority"]:
        raise TypeError(f"RequestRecord's fields changed: {names}")
    defaults = tuple(f.default for f in fields(RequestRecord)[5:])
    if MISSING in defaults or hasattr(RequestRecord, "__post_init__"):
        raise TypeError("RequestRecord's __init__ does more than set its fields to plain defaults")
    return tuple(_slot(RequestRecord, name) for name in names), defaults


_RECORD_SLOTS, _RECORD_DEFAULTS = _record_slots()
# The record's times, set once per request each: through `_slot_set`, not an attribute lookup, in the compiled core.
_RECORD_FIRST_SCHEDULED = _slot(RequestRecord, "first_scheduled")
_RECORD_FIRST_TOKEN = _slot(RequestRecord, "first_token")
_RECORD_FINISH = _slot(RequestRecord, "finish")


def _new_record(
    request_id: str, arrival: float, prompt_tokens: int, output_tokens: int, priority: int
) -> RequestRecord:
    """`RequestRecord(request_id, arrival, prompt_tokens, output_tokens, priority)`. In the compiled core its
    slots are set from C (the dataclass's generated `__init__`, interpreted Python, cost most of a request's
    setup there), and it is left out of the cyclic collector's walks, as CPython does for a tuple of atoms: its
    fields are a str and numbers, which make no cycle."""
    if not _IN_C:
        return RequestRecord(request_id, arrival, prompt_tokens, output_tokens, priority)
    record = _new_bare(RequestRecord)
    _slot_set(record, _RECORD_SLOTS[0], request_id)
    _slot_set(record, _RECORD_SLOTS[1], arrival)
    _slot_set(record, _RECORD_SLOTS[2], prompt_tokens)
    _slot_set(record, _RECORD_SLOTS[3], output_tokens)
    _slot_set(record, _RECORD_SLOTS[4], priority)
    _slots_set(record, _RECORD_SLOTS, 5, _RECORD_DEFAULTS)
    _untrack(record)
    return record  # type: ignore[return-value]


def _step_slots() -> tuple:
    """EngineStep's slots in `_new_step`'s argument order, after checking that its __init__ would set only
    these and the two empty tuples of `_STEP_UNSET`."""
    names = [f.name for f in fields(EngineStep)]
    expected = ["step", "start_time", "duration", "scheduled_tokens", "preempted", "resumed", "finished"]
    if names != [*expected, "kv_blocks_used", "cached_tokens"] or hasattr(EngineStep, "__post_init__"):
        raise TypeError(f"EngineStep's fields changed: {names}")
    return tuple(_slot(EngineStep, name) for name in [*expected[:5], "kv_blocks_used", "cached_tokens"])


_STEP_SLOTS = _step_slots()
_STEP_UNSET = (_slot(EngineStep, "resumed"), _slot(EngineStep, "finished"))


def _new_step(
    step: int,
    start_time: float,
    duration: float,
    scheduled_tokens: dict[str, int],
    preempted: tuple[str, ...],
    kv_blocks_used: int,
    cached_tokens: dict[str, int],
) -> EngineStep:
    """`EngineStep(step, start_time, ...)` of a recorded step, its slots set from C in the compiled core (the
    frozen dataclass's `__init__`, interpreted Python, cost more than the rest of a step-space replay)."""
    values = (step, start_time, duration, scheduled_tokens, preempted, kv_blocks_used, cached_tokens)
    if not _IN_C:
        return EngineStep(*values[:5], kv_blocks_used=kv_blocks_used, cached_tokens=cached_tokens)
    logged = _new_bare(EngineStep)
    _slots_set(logged, _STEP_SLOTS, 0, values)
    _slot_set(logged, _STEP_UNSET[0], ())
    _slot_set(logged, _STEP_UNSET[1], ())
    return logged  # type: ignore[return-value]


# Below 2**62 (picoseconds: 53 days) a double's integer part converts exactly to a C 64-bit integer.
_ROUND_LIMIT = 4611686018427387904.0  # 2**62


def _to_ps(time: float) -> int:
    """`round(time * PS_PER_S)`, the time `time` in integer picoseconds; rounded half to even, as `round` does,
    in C where the compiled core can (a float, below 2**62 ps)."""
    if isinstance(time, float):
        seconds = time  # a C double in the compiled core: no Python float for the product
        x = seconds * 1e12  # the float product `time * PS_PER_S` is: 10**12 is an exact double
        if -_ROUND_LIMIT < x < _ROUND_LIMIT:
            n = int(x)
            rest = x - n  # exact: the fraction of a double
            if rest > 0.5 or (rest == 0.5 and n % 2):
                n += 1
            elif rest < -0.5 or (rest == -0.5 and n % 2):
                n -= 1
            return n
    return round(time * PS_PER_S)


def _ascending(values: list[int]) -> bool:
    # A loop, not all() over a generator: in the compiled core that generator cost more than a request's setup.
    n = len(values)
    i = 1
    while i < n and values[i - 1] <= values[i]:
        i += 1
    return i >= n


def simulate(
    requests: Sequence[RequestArrival],
    policy: Policy | str,
    cost: LinearCostModel,
    *,
    num_kv_blocks: int,
    block_size: int,
    initial_running: Sequence[RunningRequest] = (),
    start_time: float | None = None,
    record_steps: bool = False,
    arrival_steps: Mapping[str, int] | None = None,
    fast_forward: bool = True,
    initial_free_queue: Sequence[int | tuple[str, int, int]] = (),
    max_steps: int | None = None,
) -> SimResult:
    """Replay `requests` (output lengths known) under `policy` on a KV cache of `num_kv_blocks` blocks
    (vLLM's count, including its null block) of `block_size` tokens.

    `initial_running` are requests already holding KV at `start_time`, in running-queue order (with those
    whose last token is in flight: `RunningRequest.finishing`).
    `arrival_steps` switches arrivals from time to step space: request id -> the number of non-empty steps
    the engine had run when the request entered its queue (the fidelity test's mode).
    `fast_forward=False` steps through the literal loop every time (the reference the shortcuts are tested on).
    `initial_free_queue` (with prefix caching) is vLLM's free queue at `start_time`, front first: a cached block
    nobody holds (its hash), or (request id, lo, hi) that request's private blocks lo..hi-1 (an id of none of
    `requests`: blocks nobody can hit).
    `max_steps` cuts the run short after that many steps (the fidelity check compares only the steps the engine
    ran in its window): its steps are the whole run's first `max_steps`, and its other figures those of the
    run at that point (requests unfinished there have no finish).
    """
    policy = parse_policy(policy)
    sim = Simulator(
        policy,
        cost,
        num_kv_blocks,
        block_size,
        record_steps=record_steps,
        fast_forward=fast_forward,
        max_steps=max_steps,
    )
    records: list[RequestRecord] = []
    num_usable_blocks = num_kv_blocks - 1
    order = policy.order

    ids: set[str] = set()  # every request's, to refuse one given twice
    for index, state in enumerate(initial_running):
        # Its fields read off their slots (`_slot_get`), as an arrival's: a window carries dozens of these.
        request = _new_request(
            _slot_get(state, _RUNNING_REQUEST), index, order, block_size, num_usable_blocks
        )
        ids.add(request.request_id)
        if _slot_get(state, _RUNNING_FINISHING):
            # Served before the start: not the replay's.
            sim.add_finishing(request, _slot_get(state, _RUNNING_COMPUTED_TOKENS))
        else:
            records.append(request.record)
            sim.add_running(
                request,
                _slot_get(state, _RUNNING_COMPUTED_TOKENS),
                _slot_get(state, _RUNNING_GENERATED_TOKENS),
            )
            if _slot_get(state, _RUNNING_DECODED_IN_FLIGHT) and sim.async_scheduling:
                # It decoded in the step before the start and in the one before that (`_to_explicit`).
                request.implicit_stamp = sim.last_decode_step = -1
                request.last_run_step, request.prev_run_step = -1, -2
                request.last_run_decode = request.last_run_sampled = True
    if sim.num_used_blocks > num_usable_blocks:
        raise ValueError(
            f"initial requests hold {sim.num_used_blocks} blocks, more than the {num_usable_blocks} available"
        )
    if sim.num_reserved_blocks > num_usable_blocks:
        # A no-eviction policy reserves each request's whole sequence at admission; requests an evicting engine
        # admitted may not all fit those reservations, and such a policy can then never have reached this state.
        raise ValueError(
            f"{policy.preset} cannot take over: its reservations for the initial requests need "
            f"{sim.num_reserved_blocks} blocks, more than the {num_usable_blocks} available"
        )
    if sim.finishing and not policy.async_scheduling:
        sim._free_finishing()  # without async scheduling, freed when the step that finished them ended
    offset = len(initial_running)
    # The replay builds two objects per request that live as long as it does, then allocates a few small ones a
    # step (chunks, lists) that die young: the cyclic collector, left on, would walk the growing heap of records
    # and requests over and over (a third of the compiled core's time while they are built, some 8% during the
    # run). The few cycles a run leaves (the prefix cache's free-queue entries and their runs) are collected once
    # it is back on.
    collecting = gc.isenabled()
    gc.disable()
    try:
        arriving: list[_Request] = []
        arrival_whens: list[int] = []  # arrival time or step
        for index, r in enumerate(requests):
            request = _new_request(r, offset + index, order, block_size, num_usable_blocks)
            records.append(request.record)
            arriving.append(request)
            arrival_whens.append(
                arrival_steps[request.request_id] if arrival_steps is not None else request.arrival_time
            )
        # Requests are told apart by id (the step log's, the implicit decoders', `arrival_steps`'): one id twice
        # would make a run of no engine.
        ids.update([request.request_id for request in arriving])
        if len(ids) < len(arriving) + len(initial_running):
            raise ValueError(
                f"request id {_repeated_id(initial_running, requests)!r} is given more than once"
            )
        if not _ascending(arrival_whens):  # a stable sort: requests arriving together stay in their order
            by_arrival = sorted(range(len(arriving)), key=arrival_whens.__getitem__)
            arriving = [arriving[i] for i in by_arrival]
            arrival_whens = [arrival_whens[i] for i in by_arrival]
        if initial_free_queue and sim.caching:
            by_id = {request.request_id: request for request in arriving}
            for entry in initial_free_queue:
                if isinstance(entry, tuple):
                    run = sim.block_pool.free_private_run(entry[1], entry[2])
                    if entry[0] in by_id:
                        by_id[entry[0]].private_run = run
                else:
                    sim.block_pool.free_block(sim.block_pool.cache_full_block(entry))
        if start_time is not None:
            sim.now = round(start_time * PS_PER_S)
        elif arrival_steps is None and (initial_running or arriving):
            sim.now = min([r.arrival_time for r in sim.running] + arrival_whens[:1])
        sim.run(arrival_whens, arriving, by_step=arrival_steps is not None)
        result = SimResult(
            policy=str(policy),
            requests=records,
            gpu_seconds=sim.busy_ps / PS_PER_S,
            recompute_gpu_seconds=sim.recompute_ps / PS_PER_S,
            num_steps=sim.num_steps,
            peak_kv_blocks=sim.peak_used_blocks,
            steps=sim.step_log if record_steps else None,
            tokens_processed=sim.num_tokens_processed,
            demands=RunDemands(
                sim.demanded_running,
                sim.demanded_tokens,
                sim.demanded_chunk,
                sim.picked_victim,
                sim.newest_victims,
                sim.least_computed_victims,
                sim.worst_priority_victims,
                sim.waiting.in_arrival_order,
            ),
        )
        # The run's requests die here, before the collector is back on (none is in a cycle): its first pass
        # then walks the records alone, not the requests too.
        sim = arriving = None  # type: ignore[assignment]
        request = None  # type: ignore[assignment]
    finally:
        if collecting:
            gc.enable()
    return result


def _repeated_id(initial_running: Sequence[RunningRequest], requests: Sequence[RequestArrival]) -> str:
    """The first request id of the carried requests, then the arrivals, that was given before."""
    seen: set[str] = set()
    for request_id in [state.request.request_id for state in initial_running] + [
        r.request_id for r in requests
    ]:
        if request_id in seen:
            return request_id
        seen.add(request_id)
    raise AssertionError("no request id is repeated")


# ---- the core in use --------------------------------------------------------------------------------------------

COMPILED_MODULE = "vllm_shadow.solver._simulator_compiled"
_PURE_MODULE = "vllm_shadow.solver._simulator_pure"


_SOURCE = Path(__file__)
_DECLARATIONS = _SOURCE.with_name("_simulator_compiled.pxd")


def compiled_core() -> ModuleType | None:
    """This file as compiled by setup.py, or None where it was not built (see solver.compiled_build)."""
    return compiled_build.compiled_module(COMPILED_MODULE)


def stale_sources(core: ModuleType) -> list[str]:
    """In a source checkout, the files edited since `core` was built (an edited .py runs as the .py until the
    core is rebuilt); none in an installed package, whose build and sources came together."""
    return compiled_build.stale_sources(core, _SOURCE, _DECLARATIONS)


def pure_core() -> ModuleType:
    """This file as plain Python over the plain-Python prefix cache, whichever core `simulate` is: the oracle the
    compiled core is tested against. Under a compiled core or pool it is loaded from the source file under a name
    of its own, so that the two cores' classes never mix (the core and the pool fall back together)."""
    pool = sys.modules["vllm_shadow.solver.kv_cache"]
    if not COMPILED and not pool.COMPILED:
        return sys.modules[__name__]
    # What its import of the pool finds: the plain-Python pool.
    return compiled_build.load_as_python(
        _PURE_MODULE, _SOURCE, using={"vllm_shadow.solver.kv_cache": pool.pure_pool()}
    )


COMPILED = False  # whether `Simulator` and `simulate` below are the compiled core's
if __name__ == "vllm_shadow.solver.simulator":
    _core = compiled_build.build_in_use(COMPILED_MODULE, _SOURCE, _DECLARATIONS, "simulator core", "core")
    if _core is not None:

        @functools.wraps(_core.simulate)
        def _simulate_exactly(*args, **kwargs):  # type: ignore[no-untyped-def]
            # The compiled core keeps times in 64-bit integers (2**63 ps is 106 days of engine time) and raises
            # OverflowError rather than wrap; the plain-Python core's ints are unbounded: the same result.
            try:
                return _core.simulate(*args, **kwargs)
            except OverflowError:
                return pure_core().simulate(*args, **kwargs)

        # Not plain assignments: in the build Cython compiles from this file, `Simulator` is an extension type,
        # whose name cannot be rebound. Its results are this package's records (it imports records.py).
        globals().update(Simulator=_core.Simulator, simulate=_simulate_exactly)
        COMPILED = True
