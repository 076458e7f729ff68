"""One engine's live request table, rebuilt from its mirror stream, and the windows cut from it.

The tracker keeps vLLM's own bookkeeping: per request the KV tokens computed and the tokens emitted, the
running queue in admission order (preemption evicts from its tail), the waiting queue (arrivals appended,
preempted requests put back at the front; ordered by (priority, arrival) under the priority policy). A step
is applied as vLLM applied it: preemptions first, then admissions in the step's own order, then tokens, then
finishes. So at every step boundary the tracker can say exactly what the engine held, which is what a window
needs to be replayed from its start.

Trust is explicit. Lost events (a gap in the sender's batch numbers, events the sender dropped, a request id
never announced) make every live request's state unknown ("tainted"): windows that depend on it are dropped,
and no new window opens until the tainted requests are gone. Every drop is counted with its reason.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from types import MemberDescriptorType, ModuleType, SimpleNamespace
from typing import Any

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival, RequestFinish
from vllm_shadow.adapters.wire import build_arrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver import compiled_build
from vllm_shadow.solver.records import RequestRecord
from vllm_shadow.solver.simulator import RunningRequest
from vllm_shadow.tracking.prefix_cache import Admission, FreeQueueEntry, PrefixCacheModel
from vllm_shadow.tracking.reasons import SkipReason
from vllm_shadow.tracking.recompute import RecomputeTax, recompute_tax, recomputed_tokens
from vllm_shadow.tracking.tracker import WindowTracker
from vllm_shadow.tracking.windows import TrafficWindow

try:
    import cython  # in the compiled tracker, Cython's compile-time module: `cython.compiled` is True there
except ImportError:  # plain Python without Cython installed: the plain tracker
    cython = SimpleNamespace(compiled=False)

_NO_HITS: dict[str, int] = {}  # a step's prefix-cache hits without a cache model (never written)
_NO_VICTIMS: tuple[str, ...] = ()

# A window's running requests and observed records are built slot by slot, as the simulator builds its records
# (`_new_record`): their dataclasses' generated `__init__`s, interpreted Python, were most of a window's build.
# In the compiled tracker `_new_slots` is C (_engine_state_compiled.pxd), which also leaves the object out of the
# cyclic collector's walks: it holds an event and numbers, which make no cycle.
if not cython.compiled:

    def _new_slots(cls: type, slots: tuple, values: tuple, defaults: tuple) -> Any:
        """`cls(*values)`: `values` then `defaults` set into `slots` (`_slots(cls, len(values))`)."""
        obj = object.__new__(cls)
        for slot, value in zip(slots, values + defaults, strict=True):
            slot.__set__(obj, value)
        return obj

    _dict_set = dict.__setitem__  # C's PyDict_SetItem in the build


def _slots(cls: type, given: int) -> tuple[tuple[MemberDescriptorType, ...], tuple[Any, ...]]:
    """`cls`'s slots in field order, and the defaults of its fields after the first `given`, after checking that
    its `__init__` would do no more than set them (what `_new_slots` does instead)."""
    fields = dataclasses.fields(cls)
    slots = tuple(cls.__dict__.get(f.name) for f in fields)
    defaults = tuple(f.default for f in fields[given:])
    if (
        hasattr(cls, "__post_init__")
        or cls.__new__ is not object.__new__
        or MISSING in defaults
        or any(type(slot) is not MemberDescriptorType for slot in slots)
    ):
        raise TypeError(f"{cls.__name__}'s __init__ does more than set its slots")
    return slots, defaults


_RUNNING_SLOTS, _NO_DEFAULTS = _slots(RunningRequest, 5)
_RECORD_SLOTS, _RECORD_DEFAULTS = _slots(RequestRecord, 5)


class _Request:
    __slots__ = (
        "admission",
        "arrival",
        "arrival_step",
        "block_hashes",
        "computed",
        "dropped_kv",
        "finish",
        "finished",
        "first_token",
        "generated",
        "last_decode",
        "last_progress",
        "last_run",
        "last_sampled",
        "max_tokens",
        "output_block_hashes",
        "prev_run",
        "priority",
        "prompt",
        "refs",
        "reported_output",
        "request_id",
        "running",
        "tainted",
    )

    def __init__(self, event: RequestArrival, arrival_step: int, now: float, tainted: bool = False) -> None:
        self.request_id = event.request_id
        self.arrival = event.time
        self.arrival_step = arrival_step
        self.prompt = event.prompt_tokens
        self.max_tokens = event.max_tokens
        self.priority = event.priority
        self.block_hashes = event.block_hashes
        self.output_block_hashes: tuple[int, ...] = ()  # its generated blocks', from its finish
        self.computed = 0
        self.dropped_kv = 0  # KV tokens its preemptions dropped (the most): what it computes again
        self.generated = 0
        self.first_token = math.nan
        self.finish = math.nan
        self.finished = False
        self.reported_output: int | None = None
        self.last_progress = now
        self.admission = -1  # when it last joined the running queue: its place there
        # Under async scheduling with prefix caching: the (non-empty) steps of its last two runs, whether its
        # last run sampled a token, and whether it computed the token its previous run sampled.
        self.last_run = self.prev_run = -2
        self.last_sampled = self.last_decode = False
        self.refs = 0  # windows (open or closed) that need this request's data
        # In the tracker's running queue: the queue's membership test on the request itself (its walk over a
        # step's requests reads this instead of hashing each id into the queue).
        self.running = False
        self.tainted = tainted  # state unknown: events about it were lost

    @property
    def output(self) -> int:
        return self.reported_output if self.reported_output is not None else self.generated

    def arrival_event(
        self, t0: float, *, prompt: int | None = None, output: int | None = None
    ) -> RequestArrival:
        """As the simulator takes it: with its generated blocks' hashes after its prompt's, which it caches
        when it finishes, unless it restarts with what it had emitted as prompt (`prompt`): a preempted
        request's generated blocks are its own private blocks until it finishes."""
        block_hashes = self.block_hashes
        if prompt is None and self.output_block_hashes:
            block_hashes += self.output_block_hashes
        # `RequestArrival(...)` with no prefix block hashes, built as the wire reader builds events: slot by slot
        # instead of through the frozen dataclass's `object.__setattr__` (in C where the reader is built). A
        # window is built while events are taken in, with one of these per request.
        return build_arrival(
            self.request_id,
            self.arrival - t0,
            self.prompt if prompt is None else prompt,
            self.output if output is None else output,
            self.max_tokens,
            self.priority,
            (),
            block_hashes,
        )


def _exits(requests: list[_Request]) -> list[tuple[str, int]]:
    """Requests leaving the engine as the prefix-cache model takes them: (id, prompt plus emitted tokens)."""
    return [(r.request_id, r.prompt + r.generated) for r in requests]


def _lookup(
    requests: dict[str, _Request], scheduled: dict[str, int]
) -> tuple[list[_Request], list[int]] | None:
    """The requests of `scheduled`'s ids and their new tokens, in its order; None where an id is not in
    `requests` (rare: its arrival was lost)."""
    # Made at their length and filled in, not appended to: no list grows step after step.
    batch, new_tokens = [None] * len(scheduled), [0] * len(scheduled)
    for index, (request_id, n) in enumerate(scheduled.items()):
        request = requests.get(request_id)
        if request is None:
            return None
        batch[index] = request
        new_tokens[index] = n
    return batch, new_tokens


def _schedule(
    batch: list[_Request],
    new_tokens: list[int],
    running: dict[str, None],
    waiting: OrderedDict[str, None],
    hits: dict[str, int],
    admissions: int,
    track_runs: bool,
    step_index: int,
    end: float,
) -> tuple[int, int, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """One step's batch (its requests and their new tokens, `_lookup`'s), applied in step order: each request
    admitted if it was not running (its hit in the prefix cache from `hits`, numbered from `admissions`), its
    KV and tokens moved on, its progress stamped `end`. The per-request walk of `EngineTracker._step`, a function
    of its own so that the compiled tracker runs it on C integers (_engine_state_compiled.pxd).

    Returns the tokens computed again (`recomputed_tokens`: a request computes again only KV below what a
    preemption dropped); the next admission number; the batch's features (T, K, P, R) as
    `batch_features(new tokens, KV before)` gives them; and those of the same batch without its recomputation
    (`without_recompute`), which the recompute tax prices (`recompute_tax`)."""
    recomputed = 0
    tokens = kv_tokens = attention_units = count = 0
    # What the recomputation adds to each feature: the batch without it is the batch less these.
    extra_tokens = extra_kv = extra_attention = extra_count = 0
    for index in range(len(batch)):
        request = batch[index]
        n = new_tokens[index]
        request_id = request.request_id
        if not request.running:  # admitted this step: new, or resumed after preemption
            del waiting[request_id]
            running[request_id] = None
            request.running = True
            request.admission = admissions
            admissions += 1
            # What it found in the prefix cache is KV it holds without computing it (nor recomputing it).
            request.computed = hits.get(request_id, 0)
        computed = request.computed
        if track_runs:
            request.last_decode = request.last_sampled and (
                computed == request.prompt + request.generated - 1
            )
            request.prev_run, request.last_run = request.last_run, step_index
            request.last_sampled = computed + n >= request.prompt + request.generated
        if n > 0:  # batch_features: a request with no new tokens counts for nothing
            after = computed + n
            tokens += n
            kv_tokens += after
            count += 1
            if n > 1:
                attention_units += n * after
            if computed < request.dropped_kv:
                again = recomputed_tokens(computed, n, request.dropped_kv)
                if again:
                    # Without them (`request_without_recompute`) it runs the rest of its new tokens from the KV
                    # they leave behind, to the same KV after the step, and not at all if nothing is left.
                    recomputed += again
                    rest = n - again
                    extra_tokens += again
                    if rest == 0:
                        extra_kv += after
                        extra_count += 1
                    if n > 1:
                        extra_attention += n * after
                    if rest > 1:
                        extra_attention -= rest * after
        computed += n
        request.computed = computed
        request.last_progress = end
        generated = request.generated
        if computed >= request.prompt + generated:  # the batch sampled a token
            request.generated = generated + 1
            if generated == 0:
                request.first_token = end
    without = (
        tokens - extra_tokens,
        kv_tokens - extra_kv,
        attention_units - extra_attention,
        count - extra_count,
    )
    return recomputed, admissions, (tokens, kv_tokens, attention_units, count), without


@dataclass(slots=True)
class _WindowBookkeeping:
    """The tracker's own record of a window while it is open and until its requests finish: ids and the
    state at its start, not the requests themselves. `_build` turns it into the `TrafficWindow` evaluated."""

    index: int
    start_step: int
    cost: LinearCostModel
    cost_error: float
    cost_samples: int
    # (id, computed, generated, finishing, decoded in flight) at the start, running-queue order; under async
    # scheduling, finishing: its last token in flight, freed after the window's first schedule; decoded in
    # flight: see `RunningRequest.decoded_in_flight`.
    running: list[tuple[str, int, int, bool, bool]]
    waiting: list[tuple[str, int]]  # (id, generated) at the start, queue order
    # The engine held more requests at the start than a window may: the window only marks time (no state,
    # no steps kept) and is counted as skipped when it closes. Evaluating it would cost more than it is worth.
    too_large: bool = False
    # Arrivals at which it is full whatever its time (`WindowRules.arrivals_to_full` of what it carried in).
    arrivals_to_full: int = 0
    own: list[str] = field(default_factory=list)
    steps: list[EngineStep] = field(default_factory=list)
    start_time: float = math.nan  # the engine clock at its first step
    arrived: int = 0  # requests that arrived while it was open
    traffic: int = 0  # arrivals and steps seen while open
    end_step: int = -1
    pending: set[str] = field(default_factory=set)  # requests not finished yet (once closed)
    # What the engine's recompute preemptions cost in its steps (`vllm_shadow.tracking.recompute`).
    recompute: RecomputeTax = field(default_factory=RecomputeTax)
    free_queue: tuple[FreeQueueEntry, ...] = ()  # the prefix cache's free queue at the start, front first

    def request_ids(self) -> list[str]:
        # entry[0], not `r, *_`: a starred target builds a list for every entry.
        return [entry[0] for entry in self.running] + [r for r, _ in self.waiting] + self.own


class EngineTracker(WindowTracker):
    """Applies one engine's events in stream order. Not thread-safe: the owner serialises calls."""

    def __init__(self, info: EngineInfo, **settings: Any) -> None:  # settings: WindowTracker's
        super().__init__(info, **settings)
        self._priority = info.scheduler.policy == "priority"
        self._requests: dict[str, _Request] = {}
        # vLLM's queues as ordered dicts (keys only): membership and removal by id are O(1), so finishes and
        # aborts stay cheap with tens of thousands of requests queued. Running: admission order. Waiting:
        # arrivals at the end, preempted requests moved to the front.
        self._running: dict[str, None] = {}
        self._waiting: OrderedDict[str, None] = OrderedDict()
        self._open: _WindowBookkeeping | None = None
        self._closed: deque[_WindowBookkeeping] = deque()
        self._tainted_live = 0
        self._next_calibration = -math.inf  # engine clock
        # With prefix caching on, what the engine's cache holds (a window's start state) and the hits it gave.
        # Hits come from the engine once it has published one (EngineStep.cached_tokens), else from the model.
        self._cache = (
            PrefixCacheModel(info.num_kv_blocks, info.block_size)
            if info.scheduler.enable_prefix_caching
            else None
        )
        self._hits_published = False
        # Under async scheduling vLLM frees what step N finished only after it has scheduled step N+1 (empty or
        # not): those requests are freed once the next step event has been replayed.
        self._async = info.scheduler.async_scheduling
        # Under async scheduling with prefix caching: requests the last step finished, which vLLM frees after
        # the next step's schedule, in running-queue order.
        self._cache_finishing: list[_Request] = []
        self._admissions = 0
        # Under async scheduling with prefix caching each request's last runs are kept (`_unhashed_tail`).
        self._track_runs = self._async and self._cache is not None

    # ---- reading --------------------------------------------------------------------------------------------

    @property
    def live_requests(self) -> int:
        return len(self._running) + len(self._waiting)

    @property
    def pending_windows(self) -> int:
        return len(self._closed) + (self._open is not None)

    @property
    def prefix_cache_mismatches(self) -> int:
        """Steps where the engine's cache hits or blocks in use differed from the tracker's model of its cache."""
        return self._cache.mismatches if self._cache is not None else 0

    # ---- events ---------------------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        self.last_event_at = self._clock()
        # The counts set through dict's own setitem (`_dict_set`): Counter's goes through a Python-level slot
        # (it defines __delitem__), which cost a fifth of a small step's whole walk.
        counts = self.stats.events
        if isinstance(event, EngineStep):
            _dict_set(counts, "step", counts["step"] + 1)
            self._step(event)
        elif isinstance(event, RequestArrival):
            _dict_set(counts, "arrival", counts["arrival"] + 1)
            self._arrival(event)
        elif isinstance(event, RequestFinish):
            _dict_set(counts, "finish", counts["finish"] + 1)
            self._finish_reported(event)
        elif isinstance(event, EngineInfo):
            self.stats.events["info"] += 1  # the same announcement again (a restart is the caller's business)

    def apply_run(self, events: Sequence[Event], start: int) -> int:
        """`apply` over `events[start:]` up to the first `EngineInfo` (the caller's); returns its index, or
        len(events). The hot path: the events of one batch arrived together, so the clock is read once and the
        counters are added once."""
        self.last_event_at = self._clock()
        steps = arrivals = finishes = 0
        index = start
        try:
            for index in range(start, len(events)):
                event = events[index]
                kind = type(event)
                if kind is EngineStep:
                    steps += 1
                    self._step(event)
                elif kind is RequestArrival:
                    arrivals += 1
                    self._arrival(event)
                elif kind is RequestFinish:
                    finishes += 1
                    self._finish_reported(event)
                elif isinstance(event, EngineInfo):
                    return index
                else:
                    self.apply(event)  # a subclass of an event kind: the general dispatch
            return len(events)
        finally:
            counts = self.stats.events
            for kind_name, count in (("step", steps), ("arrival", arrivals), ("finish", finishes)):
                if count:
                    counts[kind_name] += count

    def lost_events(self) -> None:
        """Events were lost just before the next one: nothing tracked so far can be trusted."""
        self._taint_all(SkipReason.LOST_EVENTS)

    def _arrival(self, event: RequestArrival) -> None:
        known = self._requests.get(event.request_id)
        if known is not None:
            if not known.finished:
                return  # announced twice (a resent batch): the first one counts
            # A finished request's id used again (vLLM takes an id again once its request finished) while
            # windows still hold the first request: they would read the second under its id, so they are
            # given up, which lets the first go.
            self._drop_windows_with({event.request_id}, SkipReason.REUSED_ID, finished_too=True)
        if len(self._requests) >= self.limits.max_live_requests:
            self.stats.requests_rejected += 1
            # The engine now holds a request we do not: the state is unknown.
            self._taint_all(SkipReason.LOST_EVENTS)
            return
        self._ensure_open()
        request = _Request(event, self.stats.steps, self._engine_now())
        self._requests[event.request_id] = request
        if self._cache is not None:
            self._cache.arrived(event.request_id, event.block_hashes)
        self._waiting[event.request_id] = None
        self.stats.requests_arrived += 1
        if self._open is not None:
            self._open.traffic += 1
            self._open.arrived += 1
            if not self._open.too_large:
                self._open.own.append(event.request_id)
                request.refs += 1

    def _finish_reported(self, event: RequestFinish) -> None:
        request = self._requests.get(event.request_id)
        if request is None:
            self.stats.unknown_requests += 1
            return
        request.reported_output = event.output_tokens
        if event.block_hashes and self._cache is not None:
            # Its generated blocks' hashes: cached when it is freed, in the cache model and in window replays.
            request.output_block_hashes = event.block_hashes
            self._cache.output_hashes(event.request_id, event.block_hashes)
        if event.request_id in self._waiting and request.generated == 0 and request.computed == 0:
            # Aborted before it ever ran: no step will name it again.
            del self._waiting[event.request_id]
            if self._cache is not None:
                self._cache.finished([(event.request_id, request.prompt)])
            self._finalize(request, event.time)

    def _step(self, step: EngineStep) -> None:
        scheduled = step.scheduled_tokens
        if not scheduled:
            self.stats.empty_steps += 1
            self._free_finishing()  # async: the previous step's finishes were freed after this (empty) schedule
            if step.finished:
                self._finish_listed(step, step.start_time + step.duration)
            return
        end = step.start_time + step.duration
        requests = self._requests
        # The step's requests, one lookup each: the walk below takes them from here (nothing before it adds or
        # replaces one). An id never announced is rare.
        found = _lookup(requests, scheduled)
        if found is None:
            self._track_unknown(step, end)
            if not scheduled.keys() <= requests.keys():  # beyond the bound, not tracked: left out below
                scheduled = {r: n for r, n in scheduled.items() if r in requests}
            found = _lookup(requests, scheduled)
        batch, new_tokens = found
        if self._open is None:
            self._ensure_open()
        victims = self._preempt(step.preempted) if step.preempted else _NO_VICTIMS
        hits = self._cache_step(step, victims) if self._cache is not None else _NO_HITS
        try:
            recomputed, self._admissions, features, without = _schedule(
                batch,
                new_tokens,
                self._running,
                self._waiting,
                hits,
                self._admissions,
                self._track_runs,
                self.stats.steps,
                end,
            )
        except KeyError:
            # It names a request that finished here and that windows still hold (its id came back for a new
            # request whose arrival was lost): what the engine holds is not what we hold. The step stays applied
            # up to that request; the state it leaves is unknown, so every live request is tainted.
            self.stats.unknown_requests += 1
            self._taint_all(SkipReason.LOST_EVENTS)
            self.stats.steps += 1
            self.stats.actual_gpu_seconds += step.duration
            self.stats.last_step_end = end
            if step.finished:
                self._finish_listed(step, end)
            return
        duration = step.duration
        # The comparison that is false in most steps first. A step of zero-token counts (valid on the wire) has
        # nothing to fit.
        if end >= self._next_calibration and self._tainted_live == 0 and duration > 0 and features[0]:
            self.calibrator.update_features(*features, duration)
            self._next_calibration = end + 1.0 / self.limits.calibration_steps_per_second
        stats = self.stats
        stats.steps += 1
        stats.actual_gpu_seconds += duration
        stats.last_step_end = end
        window = self._open
        full = False
        if window is not None:
            window.traffic += 1
            start = window.start_time
            if start != start:  # nan: the window's first step
                start = window.start_time = step.start_time
            if not window.too_large:
                window.steps.append(step)
                if step.preempted or recomputed:
                    window.recompute += recompute_tax(
                        self.calibrator.model(), features, without, recomputed, len(step.preempted)
                    )
            # Full (`WindowRules.full`, through `arrivals_to_full`): closed once this step's finishes are in,
            # and the next one opened at once.
            seconds = self.rules.seconds
            full = (
                seconds is not None and (0.0 if start != start else end - start) >= seconds
            ) or window.arrived >= window.arrivals_to_full
        if step.finished:
            self._finish_listed(step, end)
        if full and self._open is window:
            self._close()
            self._ensure_open()

    def _track_unknown(self, step: EngineStep, end: float) -> None:
        """The step names requests never announced: their arrivals were lost, so from here on what the engine
        holds is not what we hold. Each is tracked as a tainted placeholder, while there is room."""
        requests = self._requests
        for request_id in step.scheduled_tokens:
            if request_id not in requests:
                self.stats.unknown_requests += 1
                self._taint_all(SkipReason.LOST_EVENTS)
                if len(requests) >= self.limits.max_live_requests:
                    self.stats.requests_rejected += 1  # no room for a placeholder either: not tracked
                    continue
                placeholder = _Request(RequestArrival(request_id, step.start_time, 1), -1, end, tainted=True)
                requests[request_id] = placeholder
                self._running[request_id] = None
                placeholder.running = True
                self._tainted_live += 1

    def _cache_step(self, step: EngineStep, victims: list[str]) -> dict[str, int]:
        """Replay the step on the prefix-cache model (victims already out of the running queue); returns the hit
        of each request it admitted."""
        assert self._cache is not None
        requests = self._requests
        published = step.cached_tokens
        if published:
            self._hits_published = True
        running, admissions = [], []
        for request_id, n in step.scheduled_tokens.items():
            request = requests.get(request_id)
            if request is None:
                continue
            if request.running:
                running.append((request_id, n))
            else:
                hit = published.get(request_id, 0) if self._hits_published else None
                admissions.append(Admission(request_id, request.prompt + request.generated, n, hit))
        preempted = [(r, requests[r].prompt + requests[r].generated, self._unhashed_tail(r)) for r in victims]
        finishing = _exits(self._cache_finishing)
        self._cache_finishing = []
        return self._cache.step(running, preempted, admissions, step.kv_blocks_used or None, finishing)

    def _unhashed_tail(self, victim_id: str) -> bool:
        """Under async scheduling, whether a victim's last block has no hash: its last run, the step before,
        computed the token its run the step before that sampled, whose output was processed only after the
        last run's caching, and a victim's own output is never cached (the simulator's `_free_cached_blocks`)."""
        if not self._async:
            return False
        victim = self._requests[victim_id]
        last_step = self.stats.steps - 1
        return victim.last_run == last_step and victim.last_decode and victim.prev_run == last_step - 1

    def _free_finishing(self) -> None:
        if self._cache is not None and self._cache_finishing:
            self._cache.finished(_exits(self._cache_finishing))
            self._cache_finishing = []

    def _preempt(self, preempted: tuple[str, ...]) -> list[str]:
        """Move the step's victims to the waiting queue; returns them in the order vLLM preempted them."""
        # vLLM evicts from the running queue's tail and puts each victim at the waiting queue's front, so the
        # victim nearest the head ends up first; the step's set of victims does not carry that order itself.
        position = {r: i for i, r in enumerate(self._running)}
        victims = sorted((r for r in preempted if r in position), key=position.__getitem__, reverse=True)
        for request_id in victims:
            del self._running[request_id]
            victim = self._requests[request_id]
            victim.running = False
            victim.dropped_kv = max(victim.dropped_kv, victim.computed)
            victim.computed = 0
            self._waiting[request_id] = None
            self._waiting.move_to_end(request_id, last=False)
        return victims

    def _finish_listed(self, step: EngineStep, end: float) -> None:
        if self._cache is not None and step.finished:
            # vLLM frees what a step finished in running-queue order (its tail blocks evicted first).
            position = {r: i for i, r in enumerate(self._running)}
            leaving = sorted(
                (r for r in step.finished if r in self._requests and not self._requests[r].finished),
                key=lambda r: position.get(r, -1),
            )
            if self._async:
                self._cache_finishing += [self._requests[r] for r in leaving]
            else:
                self._cache.finished(
                    [(r, self._requests[r].prompt + self._requests[r].generated) for r in leaving]
                )
        for request_id in step.finished:
            request = self._requests.get(request_id)
            if request is None or request.finished:
                continue
            if request.running:
                del self._running[request_id]
                request.running = False
            elif request_id in self._waiting:
                del self._waiting[request_id]
            if request.reported_output is not None and request.reported_output != request.generated:
                self.stats.inconsistencies += 1
            self._finalize(request, end)

    def _finalize(self, request: _Request, when: float) -> None:
        request.finished = True
        request.finish = when
        if request.tainted:
            self._tainted_live -= 1
        else:
            self.stats.requests_finished += 1
        for window in list(self._closed):
            window.pending.discard(request.request_id)
        self._release_ready()
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        if request.finished and request.refs <= 0:
            self._requests.pop(request.request_id, None)

    # ---- windows --------------------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._open is not None or self._tainted_live:
            return
        if self.live_requests >= self.rules.max_requests:
            self._open = _WindowBookkeeping(
                self._next_index, self.stats.steps, self.calibrator.model(), math.nan, 0, [], []
            )
            self._open.too_large = True
            self._open.arrivals_to_full = self.rules.arrivals_to_full(0)
            self._next_index += 1
            return
        requests = self._requests
        running = [
            (r, requests[r].computed, requests[r].generated, False, self._unhashed_tail(r))
            for r in self._running
        ]
        # Finished, not yet freed (async): in the running queue until then, merged in at their places. One
        # that did not finish as a request does (aborted) is taken as freed already.
        finishing = [
            r for r in self._cache_finishing if r.generated and r.computed == r.prompt + r.generated - 1
        ]
        aborted = _exits([r for r in self._cache_finishing if r not in finishing])
        if finishing:
            for request in finishing:
                requests.setdefault(request.request_id, request)  # kept until the window is built
            running += [(r.request_id, r.computed, r.generated, True, False) for r in finishing]
            running.sort(key=lambda entry: requests[entry[0]].admission)
        order = list(self._waiting)
        if self._priority:
            order.sort(key=lambda r: (requests[r].priority, requests[r].arrival))
        waiting = [(r, requests[r].generated) for r in order]
        for entry in running:
            requests[entry[0]].refs += 1
        for request_id in order:
            requests[request_id].refs += 1
        self._open = _WindowBookkeeping(
            self._next_index,
            self.stats.steps,
            self.calibrator.model(),
            self.calibrator.mape(),
            self.calibrator.samples,
            running,
            waiting,
            arrivals_to_full=self.rules.arrivals_to_full(len(running) + len(order)),
            free_queue=self._cache.free_queue(aborted) if self._cache is not None else (),
        )
        self._next_index += 1

    def close_idle(self) -> None:
        """Close the open window if it holds requests and the engine has been silent for `idle_seconds`."""
        window = self._open
        if (
            window is not None
            and window.own
            and self._clock() - self.last_event_at >= self.rules.idle_seconds
        ):
            self._close()

    def flush(self) -> None:
        """Close the open window now (the end of a run)."""
        if self._open is not None:
            self._close()

    def _close(self) -> None:
        window, self._open = self._open, None
        assert window is not None
        if window.too_large:
            self._drop(window, SkipReason.TOO_LARGE)
            return
        if not window.own and not window.steps:
            self._unref(window)
            return
        window.end_step = self.stats.steps
        window.pending = {r for r in window.request_ids() if not self._requests[r].finished}
        self.stats.windows_closed += 1
        self._closed.append(window)
        while len(self._closed) > self.limits.max_pending_windows:
            self._drop(self._closed.popleft(), SkipReason.BACKLOG)
        self._release_ready()

    def _release_ready(self) -> None:
        while self._closed and not self._closed[0].pending:
            window = self._closed.popleft()
            self._ready.append(self._build(window))
            self.stats.windows_ready += 1
            self._unref(window)

    def _drop(self, window: _WindowBookkeeping, reason: SkipReason) -> None:
        if window.traffic:  # a window that saw no traffic is no loss
            self.stats.windows_skipped[reason] += 1
        self._unref(window)

    def _unref(self, window: _WindowBookkeeping) -> None:
        requests = self._requests
        for request_id in window.request_ids():
            request = requests.get(request_id)
            if request is not None:
                request.refs -= 1
                if request.finished and request.refs <= 0:  # `_forget`, inline: once per request of a window
                    del requests[request_id]

    def _build(self, window: _WindowBookkeeping) -> TrafficWindow:
        requests = self._requests
        t0 = window.start_time
        if math.isnan(t0):  # no step ran while it was open: start at its first arrival
            t0 = min((requests[r].arrival for r in window.own), default=0.0)
        approximations = 0
        running = []
        for request_id, computed, generated, finishing, decoded_in_flight in window.running:
            request = requests[request_id]
            if finishing:
                arrival = request.arrival_event(t0, output=generated)
            else:
                output = request.output
                if output <= generated:  # aborted right at the window start: let it emit one more token
                    output, approximations = generated + 1, approximations + 1
                arrival = request.arrival_event(t0, output=output)
            # RunningRequest(arrival, computed, generated, finishing, decoded_in_flight)
            running.append(
                _new_slots(
                    RunningRequest,
                    _RUNNING_SLOTS,
                    (arrival, computed, generated, finishing, decoded_in_flight),
                    _NO_DEFAULTS,
                )
            )
        waiting = []
        for request_id, generated in window.waiting:
            request = requests[request_id]
            output = request.output
            if output <= generated:
                output, approximations = generated + 1, approximations + 1
            # A preempted request recomputes its prompt and what it had emitted, then emits the rest.
            waiting.append(
                request.arrival_event(t0, prompt=request.prompt + generated, output=output - generated)
            )
        arrivals, arrival_steps, observed = [], {}, {}
        for request_id in window.own:
            request = requests[request_id]
            output = request.output
            if output < 1:
                if request.computed == 0 and request.generated == 0:
                    continue  # aborted before it ever ran: it never touched the engine
                output, approximations = 1, approximations + 1  # aborted mid-prefill
            arrival = request.arrival_event(t0, output=output)
            arrivals.append(arrival)
            arrival_steps[request_id] = request.arrival_step - window.start_step
            record = _new_slots(
                RequestRecord,
                _RECORD_SLOTS,
                (request_id, arrival.time, arrival.prompt_tokens, output, arrival.priority),
                _RECORD_DEFAULTS,
            )
            record.first_token = request.first_token - t0
            record.finish = request.finish - t0
            observed[request_id] = record
        self.stats.approximations += approximations
        return TrafficWindow(
            engine=self.key,
            index=window.index,
            info=self.info,
            start_time=t0,
            running=tuple(running),
            waiting=tuple(waiting),
            arrivals=tuple(arrivals),
            arrival_steps=arrival_steps,
            steps=tuple(window.steps),
            observed=observed,
            cost=window.cost,
            cost_error=window.cost_error,
            cost_samples=window.cost_samples,
            approximations=approximations,
            recompute=window.recompute,
            free_queue=window.free_queue,
        )

    # ---- time-outs and loss ---------------------------------------------------------------------------------

    def _engine_now(self) -> float:
        last = self.stats.last_step_end
        return last if last == last else -math.inf

    def expire(self) -> None:
        """Give up on stalled requests (engine clock) and on a silent engine's live state (shadow clock)."""
        if self.live_requests and self._clock() - self.last_event_at > self.limits.engine_silence_seconds:
            self.stats.requests_abandoned += self.live_requests - self._tainted_live
            self._discard_live(SkipReason.ENGINE_SILENT)
            return
        now = self._engine_now()
        deadline = now - self.limits.request_stall_seconds
        stalled = [r for r in self._running if self._requests[r].last_progress < deadline]
        if stalled:
            self.stats.requests_timed_out += sum(not self._requests[r].tainted for r in stalled)
            if self._cache is not None:
                self._cache.reset()  # the engine's cache no longer follows from what we saw
                self._cache_finishing = []
            for request_id in stalled:
                del self._running[request_id]
                self._requests[request_id].running = False
            self._drop_windows_with(set(stalled), SkipReason.REQUEST_TIMEOUT)
            for request_id in stalled:
                self._give_up(self._requests[request_id])

    def abandon(self, reason: SkipReason = SkipReason.ENGINE_RESTART) -> None:
        """The engine is gone (restarted): count its live requests and drop every window that waits on them."""
        self.stats.requests_abandoned += self.live_requests - self._tainted_live
        self._discard_live(reason)
        if self._open is not None:
            window, self._open = self._open, None
            self._drop(window, reason)

    def _discard_live(self, reason: SkipReason) -> None:
        if self._cache is not None:
            self._cache.reset()
            self._cache_finishing = []
        live = set(self._running) | set(self._waiting)
        self._running, self._waiting = {}, OrderedDict()
        self._drop_windows_with(live, reason)
        for request_id in live:
            self._give_up(self._requests[request_id])

    def _give_up(self, request: _Request) -> None:
        if request.tainted:
            self._tainted_live -= 1
        request.finished = True
        request.running = False  # out of the queues (`_discard_live` empties them)
        request.tainted = False
        self._forget(request)

    def _drop_windows_with(
        self, request_ids: set[str], reason: SkipReason, *, finished_too: bool = False
    ) -> None:
        """Give up the windows that hold any of `request_ids`: a closed window while they are pending in it (or in
        any role, `finished_too`), the open one in any role."""
        kept = deque()
        for window in self._closed:
            if not request_ids.isdisjoint(window.request_ids() if finished_too else window.pending):
                self._drop(window, reason)
            else:
                kept.append(window)
        self._closed = kept
        if self._open is not None and request_ids.intersection(self._open.request_ids()):
            window, self._open = self._open, None
            self._drop(window, reason)
        self._release_ready()

    def _taint_all(self, reason: SkipReason) -> None:
        if self._tainted_live == self.live_requests and not self._closed and self._open is None:
            # Already all unknown, no window left: nothing to do. A flood of refused arrivals or unknown ids
            # costs O(1) each, not a pass over every live request.
            return
        if self._cache is not None:
            self._cache.reset()
            self._cache_finishing = []
        for window in self._closed:
            self._drop(window, reason)
        self._closed.clear()
        if self._open is not None:
            window, self._open = self._open, None
            self._drop(window, reason)
        for request_id in (*self._running, *self._waiting):
            request = self._requests[request_id]
            if not request.tainted:
                request.tainted = True
                self._tainted_live += 1


# ---- the tracker in use -----------------------------------------------------------------------------------------

COMPILED_MODULE = "vllm_shadow.tracking._engine_state_compiled"
_PURE_MODULE = "vllm_shadow.tracking._engine_state_pure"
_SOURCE = Path(__file__)
_DECLARATIONS = _SOURCE.with_name("_engine_state_compiled.pxd")
# What the build hands out in place of this file's own (the rest is this file's either way).
_COMPILED_NAMES = ("EngineTracker", "_Request", "_WindowBookkeeping", "_schedule")


def compiled_tracker() -> ModuleType | None:
    """This file as compiled by setup.py, or None where it was not built (see solver.compiled_build)."""
    return compiled_build.compiled_module(COMPILED_MODULE)


def pure_tracker() -> ModuleType:
    """This file as plain Python, whichever tracker is in use: the oracle the compiled tracker is tested against.
    Under the compiled tracker it is loaded from the source file under a name of its own, so that the two
    trackers' classes never mix."""
    if not COMPILED:
        return sys.modules[__name__]
    return compiled_build.load_as_python(_PURE_MODULE, _SOURCE)


COMPILED = False  # whether `EngineTracker` above is the compiled tracker
if __name__ == "vllm_shadow.tracking.engine_state":
    _tracker = compiled_build.build_in_use(
        COMPILED_MODULE, _SOURCE, _DECLARATIONS, "engine tracker", "tracker"
    )
    if _tracker is not None:
        # Not plain assignments: in the build Cython compiles from this file, `_Request` is an extension type,
        # whose name cannot be rebound.
        globals().update({name: getattr(_tracker, name) for name in _COMPILED_NAMES})
        COMPILED = True
