"""The shadow's core: ingest, per-engine tracking, the evaluation queue, results and recommendations.

Ingest is the hot path and does bookkeeping only: reorder a sender's batches, route each event to its engine's
tracker, O(1) per token count. Everything slow happens in `tick()`, called from a maintenance thread: closing
idle windows, time-outs, handing ready windows to the task runner, collecting results, recommending. Task
submission and result assembly run outside the lock, so evaluation never holds up ingest. Every bound is
explicit (reorder buffer, live requests, closed windows, queued and in-flight evaluations, engines and senders)
and every loss is counted with a reason. Engines and senders are kept in least-recently-heard order: when a new
one would pass its bound, the one silent longest makes room if it has been silent for `idle_eviction_seconds`
(counted as evicted); otherwise the newcomer's events are refused (counted as unattributed). A flood of new
names cannot push out the engines that are talking.

Engines are keyed by vLLM's own labels (model name, engine index). A sender announces its engine with an
`EngineInfo`; what it sends next tells its kind: steps (the mirror hook) or finished-request reports (OTLP
spans, the stat-logger plugin, whose arrivals carry their output length). A mirror outranks a request-only
sender for the same engine; a new sender of the same kind for the same engine is the engine restarted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_shadow.adapters.events import EngineInfo, EngineStep, Event, RequestArrival
from vllm_shadow.adapters.publisher import EventBatch
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.evaluation.candidates import Candidate, SearchSpace, build_candidates
from vllm_shadow.evaluation.costs import engine_prior
from vllm_shadow.evaluation.recommend import Goal, Verdict, recommend
from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.evaluation.window import (
    AssembledEvaluation,
    EvaluationSettings,
    TaskOutputs,
    WindowTask,
    assemble_evaluation,
    plan_tasks,
)
from vllm_shadow.readout.snapshot import EngineSnapshot, Histogram, ShadowSnapshot
from vllm_shadow.runtime.tasks import TaskResult, TaskRunner
from vllm_shadow.tracking.engine_state import EngineTracker
from vllm_shadow.tracking.reasons import SkipReason, UnattributedReason
from vllm_shadow.tracking.recompute import RecomputeTax
from vllm_shadow.tracking.request_only import RequestOnlyTracker
from vllm_shadow.tracking.sequencing import Sequencer, SequenceStats
from vllm_shadow.tracking.tracker import TrackerLimits, WindowTracker
from vllm_shadow.tracking.windows import EngineKey, TrafficWindow, WindowRules

logger = logging.getLogger(__name__)

STEPS, REQUESTS = "steps", "requests"


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    windows: WindowRules = field(default_factory=WindowRules)
    limits: TrackerLimits = field(default_factory=TrackerLimits)
    space: SearchSpace = field(default_factory=SearchSpace)
    goal: Goal = field(default_factory=Goal)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    hardware: str = "h100"  # for the cost prior, until calibration takes over
    reorder_batches: int = 64
    reorder_seconds: float = 1.0
    assumed_engine: EngineInfo | None = None  # for senders that never announce an engine (OTLP spans)
    # Each engine costs a tracker and its series on /metrics (about 270 once it has evaluated windows under a
    # 20-candidate grid; prometheus-client renders some 10k series a second); each sender a reorder buffer. An
    # engine or sender silent for idle_eviction_seconds may make room for a new one.
    max_engines: int = 16
    max_sources: int = 256
    idle_eviction_seconds: float = 300.0


@dataclass(slots=True)
class _Source:
    name: str
    transport: str
    sequencer: Sequencer
    last_heard: float = -math.inf  # monotonic
    info: EngineInfo | None = None
    engine: _Engine | None = None
    ignored: bool = False  # a request-only observer of an engine whose mirror we already have


@dataclass(slots=True)
class _Engine:
    key: EngineKey
    source: str
    mode: str
    tracker: WindowTracker
    candidates: list[Candidate]
    cost_prior: str
    restarts: int = 0
    lag: float = math.nan
    evaluated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    candidate_failures: int = 0
    optimal_failures: int = 0
    eval_seconds: Histogram = field(default_factory=Histogram)
    history: deque[WindowEvaluation] = field(default_factory=deque)
    last: WindowEvaluation | None = None
    simulated: dict[str, float] = field(default_factory=dict)
    actual: float = 0.0
    optimal_bound: float = 0.0
    constrained_bound: float = 0.0  # the bound at equal or better latency
    recompute: RecomputeTax = field(default_factory=RecomputeTax)
    verdict: Verdict | None = None

    @property
    def current(self) -> str:
        return self.candidates[0].label

    def reset_results(self) -> None:
        """The configuration changed: evidence gathered under the old one says nothing about the new one."""
        self.history.clear()
        self.simulated.clear()
        self.actual = self.optimal_bound = self.constrained_bound = 0.0
        self.recompute = RecomputeTax()
        self.verdict = None


@dataclass(slots=True)
class _InFlight:
    """A window's evaluation tasks, submitted: one future per task of `evaluation.window.plan_tasks`."""

    window: TrafficWindow
    candidates: list[Candidate]
    fidelity: Future[TaskResult]
    candidate_chunks: list[Future[TaskResult]]
    optimal: Future[TaskResult] | None
    submitted: float  # monotonic

    @property
    def futures(self) -> list[Future[TaskResult]]:
        optimal = [] if self.optimal is None else [self.optimal]
        return [self.fidelity, *self.candidate_chunks, *optimal]


class ShadowCore:
    def __init__(
        self,
        config: ShadowConfig,
        runner: TaskRunner,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._runner = runner
        self._clock = clock
        self._monotonic = monotonic
        for bound in ("max_engines", "max_sources"):
            if getattr(config, bound) < 1:
                raise ValueError(f"{bound} must be at least 1, not {getattr(config, bound)}")
        self._lock = threading.Lock()
        # Least recently heard first: the candidates for eviction.
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._engines: OrderedDict[EngineKey, _Engine] = OrderedDict()
        self._sources_evicted = 0
        self._engines_evicted = 0
        self._queue: deque[TrafficWindow] = deque()
        self._in_flight: list[_InFlight] = []
        self._candidates: dict[object, list[Candidate]] = {}  # by scheduler settings
        self._priors: dict[str, tuple[LinearCostModel, str]] = {}  # by announcement, engine index left out
        self._batches: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._unattributed: Counter[str] = Counter()
        self._evaluated = 0
        self.started_at = clock()

    # ---- ingest (hot path) ----------------------------------------------------------------------------------

    def ingest(self, batch: EventBatch, transport: str = "ray") -> int:
        """Take one batch from any transport. Never waits on evaluation."""
        with self._lock:
            self._batches[transport] += 1
            self._events[transport] += len(batch.events)
            source = self._sources.get(batch.source)
            if source is None:
                if not self._make_room(
                    self._sources, self.config.max_sources, self._source_silence, self._evict_source
                ):
                    self._unattributed[UnattributedReason.TOO_MANY_SOURCES] += len(batch.events)
                    return 0
                source = self._new_source(batch.source, transport)
            else:
                self._sources.move_to_end(batch.source)
            source.last_heard = self._monotonic()
            pushed = source.sequencer.push(batch)
            for delivery in pushed.deliveries:
                self._deliver(source, delivery.batch, delivery.gap_before, delivery.restart)
        return len(batch.events) if pushed.accepted else 0  # the ack never claims events dropped as late

    def _deliver(self, source: _Source, batch: EventBatch, gap_before: bool, restart: bool = False) -> None:
        if restart and source.engine is not None:  # a new publisher under the same name: the engine restarted
            self._detach_restarted(source)
        if gap_before and source.engine is not None:
            source.engine.tracker.lost_events()
        events = batch.events
        index, end = 0, len(events)
        while index < end:
            engine = source.engine
            if engine is not None and not source.ignored:
                # Straight to its tracker up to the next announcement, which `_route` takes (a restart?).
                index = engine.tracker.apply_run(events, index)
                if index == end:
                    break
            self._route(source, events[index])
            index += 1
        last_step_end = math.nan
        for event in reversed(events):
            if isinstance(event, EngineStep):
                last_step_end = event.start_time + event.duration
                break
        if source.engine is not None:
            self._engines.move_to_end(source.engine.key)
            if last_step_end == last_step_end:
                source.engine.lag = self._clock() - last_step_end

    def _new_source(self, name: str, transport: str) -> _Source:
        source = _Source(
            name,
            transport,
            Sequencer(
                max_held=self.config.reorder_batches,
                max_wait=self.config.reorder_seconds,
                clock=self._monotonic,
            ),
            last_heard=self._monotonic(),
        )
        self._sources[name] = source
        return source

    def _make_room(
        self, table: OrderedDict, bound: int, silence: Callable[[Any], float], evict: Callable[[Any], None]
    ) -> bool:
        """Whether `table` can take one more: below its bound, or its least recently heard entry has been
        silent long enough to be evicted (and is). O(1): only the head is looked at."""
        if len(table) < bound:
            return True
        oldest = next(iter(table.values()))
        if silence(oldest) < self.config.idle_eviction_seconds:
            return False
        evict(oldest)
        return True

    def _source_silence(self, source: _Source) -> float:
        return self._monotonic() - source.last_heard

    def _engine_silence(self, engine: _Engine) -> float:
        return self._monotonic() - engine.tracker.last_event_at

    def _evict_source(self, source: _Source) -> None:
        del self._sources[source.name]
        self._sources_evicted += 1
        if source.engine is not None and source.engine.source == source.name:
            source.engine.source = ""  # the engine stays until it is evicted itself

    def _evict_engine(self, engine: _Engine) -> None:
        del self._engines[engine.key]
        self._engines_evicted += 1
        engine.tracker.abandon(SkipReason.ENGINE_SILENT)
        source = self._sources.get(engine.source)
        if source is not None and source.engine is engine:
            source.engine = None  # should it speak again, it attaches as a new engine

    def _route(self, source: _Source, event: Event) -> None:
        if isinstance(event, EngineInfo):
            self._announce(source, event)
            return
        if source.ignored:
            self._unattributed[UnattributedReason.DUPLICATE_SOURCE] += 1
            return
        if source.info is None:
            if self.config.assumed_engine is None:
                self._unattributed[UnattributedReason.NO_ENGINE_INFO] += 1
                return
            source.info = self.config.assumed_engine
        if source.engine is None:
            reports_finished = isinstance(event, RequestArrival) and event.output_tokens is not None
            refused = self._attach(source, REQUESTS if reports_finished else STEPS)
            if source.engine is None:
                self._unattributed[refused or UnattributedReason.DUPLICATE_SOURCE] += 1
                return
        source.engine.tracker.apply(event)

    def _announce(self, source: _Source, info: EngineInfo) -> None:
        if source.info == info:
            return  # announced again
        if source.engine is not None:  # the same sender, a different engine: it was restarted in place
            self._detach_restarted(source)
        source.info = info
        source.ignored = False

    def _detach_restarted(self, source: _Source) -> None:
        assert source.engine is not None
        source.engine.tracker.abandon(SkipReason.ENGINE_RESTART)
        source.engine.restarts += 1
        source.engine.source = ""  # re-attached on the sender's next event
        source.engine = None

    def _attach(self, source: _Source, mode: str) -> UnattributedReason | None:
        """Attach `source` to its engine (tracked anew, or taken over); a reason when there is no room."""
        assert source.info is not None
        key = EngineKey.of(source.info)
        existing = self._engines.get(key)
        if existing is None and not self._make_room(
            self._engines, self.config.max_engines, self._engine_silence, self._evict_engine
        ):
            return UnattributedReason.TOO_MANY_ENGINES
        restarted = False
        if existing is not None and existing.source and existing.source != source.name:
            if existing.mode == STEPS and mode == REQUESTS:
                source.ignored = True  # the mirror sees more; this sender only reports finished requests
                return None
            reason = (
                SkipReason.SUPERSEDED
                if existing.mode == REQUESTS and mode == STEPS
                else SkipReason.ENGINE_RESTART
            )
            restarted = reason == SkipReason.ENGINE_RESTART
            existing.tracker.abandon(reason)
            stale = self._sources.get(existing.source)
            if stale is not None:
                stale.engine = None
                stale.ignored = reason == SkipReason.SUPERSEDED
        tracker_cls = EngineTracker if mode == STEPS else RequestOnlyTracker
        prior, prior_source = self._prior_for(source.info)
        tracker = tracker_cls(
            source.info,
            rules=self.config.windows,
            prior=prior,
            limits=self.config.limits,
            first_index=existing.tracker.next_index if existing is not None else 0,
            clock=self._monotonic,
        )
        candidates = self._candidates_for(source.info)
        if existing is None:
            engine = _Engine(key, source.name, mode, tracker, candidates, prior_source)
            self._engines[key] = engine
        else:
            engine = existing
            old = existing.tracker
            tracker.stats = old.stats  # counters run on across restarts, as Prometheus expects
            if (
                mode == STEPS
                and old.info.model_config == source.info.model_config
                and (old.info.tensor_parallel_size == source.info.tensor_parallel_size)
            ):
                tracker.calibrator = old.calibrator  # same model, same hardware: same step times
            if engine.current != candidates[0].label:
                engine.reset_results()
            engine.restarts += restarted
            engine.source, engine.mode, engine.tracker = source.name, mode, tracker
            engine.candidates, engine.cost_prior = candidates, prior_source
        source.engine = engine
        return None

    def _prior_for(self, info: EngineInfo) -> tuple[LinearCostModel, str]:
        """`engine_prior`, once for all the engines that announce the same but for their index (replicas of
        one deployment, an engine restarted): its roofline fit takes as long as thousands of events."""
        key = repr(replace(info, engine=""))
        if key not in self._priors:
            self._priors[key] = engine_prior(info, self.config.hardware)
        return self._priors[key]

    def _candidates_for(self, info: EngineInfo) -> list[Candidate]:
        settings = info.scheduler
        if settings not in self._candidates:
            self._candidates[settings] = build_candidates(settings, self.config.space)
        return self._candidates[settings]

    # ---- maintenance ----------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Time-outs, idle windows, evaluation. Call it often (the service does, every few hundred ms)."""
        with self._lock:
            for source in self._sources.values():
                for delivery in source.sequencer.expire():
                    self._deliver(source, delivery.batch, delivery.gap_before, delivery.restart)
            for engine in self._engines.values():
                engine.tracker.expire()
                engine.tracker.close_idle()
                self._enqueue(engine)
        self._expire_evaluations()  # first: a result that came after the limit is too late, however close
        self._collect()
        self._submit()

    def flush(self) -> None:
        """Close every open window now (the end of a run), so that its requests are evaluated."""
        with self._lock:
            for engine in self._engines.values():
                engine.tracker.flush()
                self._enqueue(engine)

    def idle(self) -> bool:
        """No window is queued or evaluating."""
        with self._lock:
            return not self._queue and not self._in_flight

    def _enqueue(self, engine: _Engine) -> None:
        for window in engine.tracker.take_ready():
            self._queue.append(window)
        while len(self._queue) > self.config.evaluation.max_queued:
            dropped = self._queue.popleft()
            self._engine_skip(dropped.engine, SkipReason.EVALUATION_BACKLOG)

    def _engine_skip(self, key: EngineKey, reason: SkipReason) -> None:
        engine = self._engines.get(key)
        if engine is not None:
            engine.skipped[reason] += 1

    def _submit(self) -> None:
        settings = self.config.evaluation
        slo = self.config.goal.slo
        while True:
            with self._lock:
                if not self._queue or len(self._in_flight) >= settings.max_in_flight:
                    return
                window = self._queue.popleft()
                candidates = self._candidates_for(window.info)
            # Outside the lock: putting a window into Ray's object store and submitting tasks takes time.
            tasks = plan_tasks(window, candidates, settings, slo)
            shared = self._runner.share(window)

            def submit(task: WindowTask, shared: object = shared) -> Future[TaskResult]:
                return self._runner.submit(task.fn, shared, *task.args, **task.kwargs)

            flight = _InFlight(
                window,
                candidates,
                fidelity=submit(tasks.fidelity),
                candidate_chunks=[submit(task) for task in tasks.candidates],
                optimal=submit(tasks.optimal) if tasks.optimal is not None else None,
                submitted=self._monotonic(),
            )
            with self._lock:
                self._in_flight.append(flight)

    def _expire_evaluations(self) -> None:
        limit = self.config.evaluation.timeout_seconds
        now = self._monotonic()
        with self._lock:
            late = [f for f in self._in_flight if now - f.submitted > limit]
            self._in_flight = [f for f in self._in_flight if f not in late]
            for flight in late:
                self._engine_skip(flight.window.engine, SkipReason.EVALUATION_TIMEOUT)
        for flight in late:
            for future in flight.futures:
                self._runner.cancel(future)

    def _collect(self) -> None:
        with self._lock:
            done = [f for f in self._in_flight if all(fut.done() for fut in f.futures)]
            self._in_flight = [f for f in self._in_flight if f not in done]
        for flight in done:
            assembled = self._assemble(flight)
            evaluation = assembled.evaluation
            with self._lock:
                engine = self._engines.get(flight.window.engine)
                if engine is None:
                    continue
                if evaluation is None:
                    engine.skipped[SkipReason.EVALUATION_ERROR] += 1
                    continue
                engine.candidate_failures += assembled.candidate_failures
                engine.optimal_failures += assembled.optimal_failed
                self._record(engine, evaluation)

    def _assemble(self, flight: _InFlight) -> AssembledEvaluation:
        """The window's evaluation from its tasks' results (none if the self replay failed)."""
        fidelity = self._task_result(flight, flight.fidelity)
        chunks = [self._task_result(flight, future) for future in flight.candidate_chunks]
        optimal = self._task_result(flight, flight.optimal) if flight.optimal is not None else None
        returned = [r for r in (fidelity, *chunks, optimal) if r is not None]
        outputs = TaskOutputs(
            fidelity=fidelity.value if fidelity is not None else None,
            candidates=tuple(r.value if r is not None else None for r in chunks),
            optimal=optimal.value if optimal is not None else None,
            locations=tuple(r.location for r in returned),
        )
        return assemble_evaluation(
            flight.window,
            flight.candidates,
            self.config.evaluation,
            outputs,
            self._monotonic() - flight.submitted,
        )

    @staticmethod
    def _task_result(flight: _InFlight, future: Future[TaskResult]) -> TaskResult | None:
        try:
            return future.result(timeout=0)
        except Exception:  # a task's failure is the window's, never the shadow's
            logger.exception(
                "evaluation task failed for %s window %d", flight.window.engine, flight.window.index
            )
            return None

    def _record(self, engine: _Engine, evaluation: WindowEvaluation) -> None:
        engine.evaluated += 1
        self._evaluated += 1
        engine.eval_seconds.observe(evaluation.evaluation_seconds)
        engine.last = evaluation
        if evaluation.current != engine.current:
            return  # evaluated under a configuration the engine no longer runs
        engine.history.append(evaluation)
        while len(engine.history) > self.config.goal.history:
            engine.history.popleft()
        for outcome in evaluation.outcomes():
            if not math.isnan(outcome.gpu_seconds):
                engine.simulated[outcome.label] = (
                    engine.simulated.get(outcome.label, 0.0) + outcome.gpu_seconds
                )
        engine.actual += evaluation.actual_gpu_seconds
        if evaluation.optimal is not None:
            engine.optimal_bound += evaluation.optimal.bound_gpu_seconds
        # Without a constrained bound on a window its unconstrained one still holds (a tighter problem never
        # has a lower optimum): the sum stays a bound over the same windows as the self replay's.
        headline = evaluation.constrained or evaluation.optimal
        if headline is not None:
            engine.constrained_bound += headline.bound_gpu_seconds
        engine.recompute += evaluation.recompute
        engine.verdict = recommend(list(engine.history), engine.candidates, self.config.goal)

    # ---- reading --------------------------------------------------------------------------------------------

    def engine_infos(self) -> dict[str, EngineInfo]:
        """Each sender's announcement (kept across a restart of the shadow: senders announce only once)."""
        with self._lock:
            return {name: s.info for name, s in self._sources.items() if s.info is not None}

    def restore(self, infos: dict[str, EngineInfo]) -> None:
        with self._lock:
            for name, info in infos.items():
                source = self._sources.get(name)
                if source is None:
                    if len(self._sources) >= self.config.max_sources:
                        break  # the state file of a shadow with a larger bound: keep what fits
                    source = self._new_source(name, "restored")
                source.info = source.info or info

    def snapshot(self, refused: dict[str, dict[str, int]] | None = None) -> ShadowSnapshot:
        with self._lock:
            engines = tuple(
                self._engine_snapshot(e) for e in sorted(self._engines.values(), key=lambda e: e.key)
            )
            return ShadowSnapshot(
                taken_at=self._clock(),
                started_at=self.started_at,
                engines=engines,
                batches=dict(self._batches),
                events=dict(self._events),
                refused=refused or {},
                unattributed_drops=dict(self._unattributed),
                queued_windows=len(self._queue),
                in_flight_windows=len(self._in_flight),
                windows_evaluated=self._evaluated,
                sources=len(self._sources),
                sources_evicted=self._sources_evicted,
                engines_evicted=self._engines_evicted,
            )

    def _engine_snapshot(self, engine: _Engine) -> EngineSnapshot:
        tracker = engine.tracker
        stats = tracker.stats
        source = self._sources.get(engine.source)
        sequence = source.sequencer.stats if source is not None else SequenceStats()

        return EngineSnapshot(
            model_name=engine.key.model_name,
            engine=engine.key.engine,
            source=engine.source,
            mode=engine.mode,
            info=tracker.info,
            current=engine.current,
            current_flags=tuple(engine.candidates[0].policy.vllm_flags()),
            candidates=tuple(c.label for c in engine.candidates),
            cost_prior=engine.cost_prior,
            cost=tracker.calibrator.model(),
            cost_error=tracker.calibrator.mape(),
            calibration_steps=tracker.calibrator.samples,
            tracker=deepcopy(stats),
            sequence=deepcopy(sequence),
            live_requests=tracker.live_requests,
            pending_windows=tracker.pending_windows,
            restarts=engine.restarts,
            ingest_lag_seconds=engine.lag,
            windows_evaluated=engine.evaluated,
            evaluation_skipped=dict(engine.skipped),
            candidate_failures=engine.candidate_failures,
            optimal_failures=engine.optimal_failures,
            evaluation_seconds=engine.eval_seconds.copy(),
            last=engine.last,
            recent=tuple(engine.history),
            simulated_gpu_seconds=dict(engine.simulated),
            actual_gpu_seconds=engine.actual,
            optimal_bound_gpu_seconds=engine.optimal_bound,
            optimal_constrained_bound_gpu_seconds=engine.constrained_bound,
            recompute=engine.recompute,
            verdict=engine.verdict,
        )
