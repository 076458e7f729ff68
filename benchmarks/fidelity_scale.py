"""Fidelity at GPU scale: vLLM's own Scheduler and AsyncScheduler, driven in-process, against the simulator.

vLLM's real scheduler classes (with the project's mirror hook recording) run as EngineCore drives them: the
sync loop `schedule() -> model output -> update_from_output()`, or with async scheduling the batch queue of
two (step N+1 is scheduled before step N's output is processed); this script plays the model, returning one
sampled token per request whose prompt is complete. Settings as on a GPU: 16-token blocks, thousands of
blocks, hundreds of sequences, chunked prefill on/off, long-prefill thresholds, FCFS/priority, prefix caching
on/off, async on/off; arrivals from the full bundled traces compressed in time until KV runs short. The
recorded stream is then replayed by the simulator in step space and compared step by step: batch membership,
tokens per request, preemption victims and prefix-cache hits.

Prompts are token ids: Mooncake's come from its hash ids (each hash id is a fixed run of tokens, so shared
hash ids are shared prefix blocks), the Azure traces' are distinct random tokens, `shared-prompt` is a
synthetic workload of a few long system prompts followed by a request's own question, and `chat` is 1,000
four-turn conversations whose every turn sends back the whole history, the engine's own replies included, a
few iterations after the previous turn finished. Sampled tokens are
distinct per request, as real generations are.

    python benchmarks/fidelity_scale.py                 # the full table (>= 1,000,000 steps), into RESULTS
    python benchmarks/fidelity_scale.py --quick         # arrivals stop after 3,000 steps; the run drains
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from vllm_shadow.adapters.events import EngineStep, Event, RequestArrival
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.adapters.vllm.prefix_workloads import conversations, prompt_from_keys
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.simulator import simulate

BLOCK_SIZE = 16
MAX_MODEL_LEN = 32768
TRACES = ("azure-conv", "azure-code", "mooncake-conv", "shared-prompt", "chat")
RESULTS = Path(__file__).resolve().parent / "RESULTS-fidelity.md"
SECTION = "## GPU scale: vLLM's Scheduler and AsyncScheduler in-process"
HEADER = """Reproduce: `python benchmarks/fidelity_scale.py` (all configurations in one process; or split them with
`--only I ... --out FILE` and write the table with `--table-from FILE ...`); CI runs a fast subset as
`tests/test_fidelity_scale.py`. vLLM 0.32's own `Scheduler` and `AsyncScheduler` classes (with the mirror hook,
`MirrorScheduler`/`MirrorAsyncScheduler`) run in-process as EngineCore drives them (sync: schedule, model output,
update; async: a batch queue of two, step N+1 scheduled before step N's output is processed); the script plays
the model. Block size 16, the full bundled traces (Azure conversation 19,366 requests, Azure code 8,819,
Mooncake conversation 12,031 with prompts built from its hash ids; a synthetic workload of 6,000 requests on
four shared system prompts), arrivals compressed in time until KV runs short. The mirrored stream is replayed
by the simulator in step space with the engine's settings and compared step by step: batch membership, tokens
per request, preemption victims (a set: vLLM reports them as one) and prefix-cache hits of every admitted or
resumed request. Steps are the non-empty ones (rounds that only preempt or only finish schedule no token)."""


@dataclass(frozen=True, slots=True)
class ScaleConfig:
    """One engine configuration on one trace."""

    trace: str
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    policy: str = "fcfs"
    enable_prefix_caching: bool = False
    async_scheduling: bool = False
    requests_per_step: float = 1.0  # arrivals compressed to this mean rate per engine iteration
    limit: int | None = None  # the first N requests of the trace (None: all)
    max_prompt_tokens: int = 16384

    def label(self) -> str:
        parts = [
            self.trace,
            f"{self.num_blocks} blocks",
            f"{self.max_num_seqs} seqs",
            f"budget {self.max_num_batched_tokens}",
            "chunked" if self.enable_chunked_prefill else "unchunked",
        ]
        if self.long_prefill_token_threshold:
            parts.append(f"threshold {self.long_prefill_token_threshold}")
        parts.append(self.policy)
        parts.append("caching" if self.enable_prefix_caching else "no caching")
        parts.append("async" if self.async_scheduling else "sync")
        return ", ".join(parts)

    def simulator_policy(self) -> str:
        return (
            f"vllm(max_num_seqs={self.max_num_seqs},max_num_batched_tokens={self.max_num_batched_tokens},"
            f"chunked_prefill={self.enable_chunked_prefill},"
            f"long_prefill_token_threshold={self.long_prefill_token_threshold},order={self.policy},"
            f"enable_prefix_caching={self.enable_prefix_caching}"
            + (",async_scheduling=true)" if self.async_scheduling else ")")
        )


# ---- workloads -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests as vLLM sees them: how to build each prompt's token ids (built when it arrives), output length,
    priority, arrival iteration."""

    request_ids: list[str]
    prompt_keys: list[
        tuple[int, ...]
    ]  # a request's prompt: the runs of tokens of these keys, cut to its length
    prompt_lengths: list[int]
    output_tokens: list[int]
    priorities: list[int]
    arrival_iterations: list[int]
    run_tokens: int  # tokens per key
    # Conversations: a turn's whole prompt (its keys are then unused), and the index of the turn whose finish
    # it waits for (its arrival iteration then counts from that finish).
    prompts: list[tuple[int, ...]] | None = None
    after: list[int | None] | None = None

    def prompt(self, index: int) -> list[int]:
        if self.prompts is not None:
            return list(self.prompts[index])
        return prompt_from_keys(self.prompt_keys[index], self.prompt_lengths[index], self.run_tokens)


def sampled_token(index: int) -> int:
    """The token the driver samples for the workload's request `index`, every step (distinct per request)."""
    return 100 + index % 29000


def _chat_workload(count: int) -> Workload:
    """Multi-turn conversations whose every turn sends back the whole history, the engine's own replies
    included: a turn hits the blocks its previous turn's output filled, cached since that turn finished. A
    turn arrives a few iterations after its previous one finished; first turns arrive steadily."""
    turns = 4
    requests = conversations(
        (count + turns - 1) // turns,
        turns,
        first_message_tokens=(200, 1500),
        user_message_tokens=(20, 300),
        output_tokens=(32, 480),
        system_prompts=3,
        system_prompt_tokens=700,
        engine_replies=True,
    )[:count]
    index = {p.arrival.request_id: i for i, p in enumerate(requests)}
    prompts: list[tuple[int, ...]] = []
    for p in requests:
        if p.after_output:  # the previous turn's prompt, what the engine generated for it, the new message
            parent = index[p.after]  # type: ignore[index]
            reply = (sampled_token(parent),) * requests[parent].arrival.output_tokens  # type: ignore[operator]
            prompts.append(prompts[parent] + reply + p.prompt_token_ids)
        else:
            prompts.append(p.prompt_token_ids)
    rng = random.Random(3)
    return Workload(
        request_ids=[p.arrival.request_id for p in requests],
        prompt_keys=[() for _ in requests],
        prompt_lengths=[len(tokens) for tokens in prompts],
        output_tokens=[p.arrival.output_tokens or 1 for p in requests],
        priorities=[0 for _ in requests],
        arrival_iterations=[rng.randint(1, 40) if p.after else 4 * i for i, p in enumerate(requests)],
        run_tokens=0,
        prompts=prompts,
        after=[index[p.after] if p.after else None for p in requests],
    )


def _shared_prompt_trace(n: int) -> list[RequestArrival]:
    """A few system prompts (1-3 thousand tokens), each request adding its own question, arriving steadily."""
    rng = random.Random(11)
    return [
        RequestArrival(
            f"s{i}", i * 0.5, 0, rng.randint(16, 400), prefix_block_hashes=(rng.randrange(4),)
        )  # prompt_tokens filled in below from the system prompt's length
        for i in range(n)
    ]


def load_workload(config: ScaleConfig) -> Workload:
    run_tokens = 0
    if config.trace == "chat":
        workload = _chat_workload(config.limit or 4000)
        if config.requests_per_step != 1.0:  # first turns' spacing scaled to the configured rate
            spacing = 1.0 / config.requests_per_step
            first = [i for i, a in enumerate(workload.after or ()) if a is None]
            iterations = list(workload.arrival_iterations)
            for n, i in enumerate(first):
                iterations[i] = int(n * spacing * 4)
            workload = dataclasses.replace(workload, arrival_iterations=iterations)
        return workload
    if config.trace == "shared-prompt":
        # A system prompt of 1,024 tokens per key (1-4 keys), then the request's own question.
        run_tokens = 1024
        arrivals = _shared_prompt_trace(config.limit or 6000)
        keys, lengths = [], []
        for i, r in enumerate(arrivals):
            system = r.prefix_block_hashes[0]
            keys.append((*(10**6 + system * 10 + k for k in range(system + 1)), 2 * 10**6 + i))
            lengths.append(1024 * (system + 1) + 20 + (i * 37) % 300)
    else:
        max_prompt_tokens, max_output_tokens = config.max_prompt_tokens, 2048
        if not config.enable_chunked_prefill:
            # vLLM requires max_model_len <= max_num_batched_tokens without chunked prefill: a longer sequence
            # (a prompt, or a resumed request's prompt and output) could never be scheduled.
            max_output_tokens = min(max_output_tokens, config.max_num_batched_tokens // 2)
            max_prompt_tokens = min(max_prompt_tokens, config.max_num_batched_tokens - max_output_tokens)
        trace = read_trace(
            resolve_trace(config.trace),
            limit=config.limit,
            max_prompt_tokens=max_prompt_tokens,
            max_output_tokens=max_output_tokens,
        )
        arrivals = trace.requests
        run_tokens = trace.block_tokens or 0
        # Mooncake: a hash id stands for block_tokens fixed tokens (shared ids, shared prefix); the Azure
        # traces' prompts are the request's own.
        keys = [
            r.prefix_block_hashes if trace.block_tokens and r.prefix_block_hashes else (3 * 10**6 + i,)
            for i, r in enumerate(arrivals)
        ]
        lengths = [r.prompt_tokens for r in arrivals]
    start = arrivals[0].time
    span = max(arrivals[-1].time - start, 1e-9)
    steps_per_second = len(arrivals) / span / config.requests_per_step
    return Workload(
        request_ids=[f"r{i}" for i in range(len(arrivals))],
        prompt_keys=keys,
        prompt_lengths=lengths,
        output_tokens=[max(1, r.output_tokens or 1) for r in arrivals],
        priorities=[i % 3 if config.policy == "priority" else 0 for i in range(len(arrivals))],
        arrival_iterations=[int((r.time - start) * steps_per_second) for r in arrivals],
        run_tokens=run_tokens,
    )


# ---- vLLM's scheduler, driven as EngineCore drives it ----------------------------------------------------------


class MemoryPublisher:
    """The hook's publisher, keeping events in memory (the stream a shadow would receive)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.publish = self.events.append

    def close(self) -> None:
        pass


def build_scheduler(config: ScaleConfig) -> tuple[Any, MemoryPublisher, Any]:
    """vLLM's Scheduler or AsyncScheduler (mirrored) for `config`, and the block hasher its requests need."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_shadow.adapters.vllm import MirrorAsyncScheduler, MirrorScheduler
    from vllm_shadow.adapters.vllm.engine_info import engine_info
    from vllm_shadow.adapters.vllm.engine_run import EngineSetup
    from vllm_shadow.adapters.vllm.scheduler import _ShadowHook

    setup = EngineSetup(
        num_kv_blocks=config.num_blocks,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        policy=config.policy,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
        enable_chunked_prefill=config.enable_chunked_prefill,
        enable_prefix_caching=config.enable_prefix_caching,
        max_model_len=4096,
        scheduler_cls=None,
    )
    vllm_config = setup.engine_args().create_engine_config()
    # GPU-scale settings the CPU platform would not choose: 16-token blocks, long contexts, async scheduling.
    vllm_config.cache_config.block_size = BLOCK_SIZE
    vllm_config.cache_config.num_gpu_blocks = config.num_blocks
    vllm_config.model_config.max_model_len = MAX_MODEL_LEN
    vllm_config.scheduler_config.max_model_len = MAX_MODEL_LEN
    vllm_config.scheduler_config.async_scheduling = config.async_scheduling
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=2, head_size=64, dtype=vllm_config.model_config.dtype
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=config.num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
    )
    cls = MirrorAsyncScheduler if config.async_scheduling else MirrorScheduler
    for name in ("SHADOW_ADDRESS", "SHADOW_RECORD", "SHADOW_RAY_ACTOR"):
        os.environ.pop(name, None)  # the hook publishes to memory here, not to a configured destination
    scheduler = cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
    )
    publisher = MemoryPublisher()
    scheduler._shadow = _ShadowHook(publisher)  # type: ignore[arg-type]
    publisher.publish(engine_info(vllm_config, config.num_blocks, BLOCK_SIZE, "0"))
    hasher = None
    if config.enable_prefix_caching:
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(BLOCK_SIZE, hash_fn)
    return scheduler, publisher, hasher


@dataclass(slots=True)
class Decided:
    """What vLLM's scheduler decided in one non-empty step."""

    scheduled_tokens: dict[str, int]
    preempted: tuple[str, ...]
    cached_tokens: dict[str, int] = field(default_factory=dict)


def _hits(output: Any) -> dict[str, int]:
    """Prompt tokens each admitted (new or resumed) request found in the prefix cache this step."""
    hits = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs if r.num_computed_tokens}
    cached = output.scheduled_cached_reqs
    for request_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
        if num_computed and request_id in cached.resumed_req_ids:
            hits[request_id] = num_computed
    return hits


def drive(
    config: ScaleConfig, workload: Workload, max_steps: int | None = None
) -> tuple[list[Decided], list]:
    """EngineCore's loop over vLLM's scheduler; returns what it decided (non-empty steps) and the hook's
    stream. `max_steps` stops feeding arrivals once that many steps ran (the run then drains)."""
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    scheduler, publisher, hasher = build_scheduler(config)
    batch_queue = 2 if config.async_scheduling else 1
    arrivals: dict[int, list[int]] = {}
    followers: dict[str, list[int]] = {}  # a turn's id -> the turns that arrive once it finished
    for index, iteration in enumerate(workload.arrival_iterations):
        parent = workload.after[index] if workload.after is not None else None
        if parent is None:
            arrivals.setdefault(iteration, []).append(index)
        else:
            followers.setdefault(workload.request_ids[parent], []).append(index)
    num_unannounced = sum(map(len, followers.values()))  # turns whose previous turn has not finished yet
    last_arrival = max(arrivals)
    decided: list[Decided] = []
    in_flight: deque = deque()
    sample_token = {rid: sampled_token(i) for i, rid in enumerate(workload.request_ids)}
    idle_rounds = 0
    for iteration in itertools.count():
        if max_steps is None or len(decided) < max_steps:
            for index in arrivals.get(iteration, ()):
                scheduler.add_request(
                    Request(
                        workload.request_ids[index],
                        workload.prompt(index),
                        SamplingParams(max_tokens=workload.output_tokens[index], ignore_eos=True),
                        None,
                        priority=workload.priorities[index],
                        block_hasher=hasher,
                    )
                )
        else:
            last_arrival, num_unannounced = -1, 0
            followers.clear()
        if (
            iteration > last_arrival
            and not num_unannounced
            and not scheduler.has_requests()
            and not in_flight
        ):
            break
        if scheduler.has_requests():
            output = scheduler.schedule()
            if output.total_num_scheduled_tokens:
                decided.append(
                    Decided(dict(output.num_scheduled_tokens), tuple(output.preempted_req_ids), _hits(output))
                )
                idle_rounds = 0
            elif (idle_rounds := idle_rounds + 1) > 1000:
                raise RuntimeError(f"{config.label()}: vLLM's scheduler schedules nothing any more")
            sampling = [r for r in output.num_scheduled_tokens if not scheduler.requests[r].is_prefill_chunk]
            in_flight.appendleft((output, sampling))
            if len(in_flight) < batch_queue and (
                output.total_num_scheduled_tokens or scheduler.has_requests()
            ):
                continue
        if in_flight:
            done, sampling = in_flight.pop()
            ids = list(done.num_scheduled_tokens)
            sampled = set(sampling)
            outputs = scheduler.update_from_output(
                done,
                ModelRunnerOutput(
                    req_ids=ids,
                    req_id_to_index={r: i for i, r in enumerate(ids)},
                    sampled_token_ids=[[sample_token[r]] if r in sampled else [] for r in ids],
                ),
            )
            if followers:
                for client_outputs in outputs.values():
                    for out in client_outputs.outputs:
                        if out.finish_reason is not None:
                            for index in followers.pop(out.request_id, ()):
                                num_unannounced -= 1
                                when = iteration + workload.arrival_iterations[index]
                                arrivals.setdefault(when, []).append(index)
                                last_arrival = max(last_arrival, when)
    scheduler.shutdown()
    return decided, publisher.events


# ---- replay and comparison ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Comparison:
    config: ScaleConfig
    steps_compared: int
    steps_identical: int
    preemptions: int
    hit_tokens: int
    first_divergence: str | None
    vllm_seconds: float
    replay_seconds: float


def _step_view(step: Decided | EngineStep) -> tuple:
    # vLLM reports a step's victims as a set (preempted_req_ids): their order carries nothing.
    return (step.scheduled_tokens, frozenset(step.preempted), step.cached_tokens)


def _describe(index: int, real: Decided, sim: EngineStep | None) -> str:
    if sim is None:
        return f"step {index}: the simulator ran out of steps"
    for what, a, b in (
        ("membership", set(real.scheduled_tokens), set(sim.scheduled_tokens)),
        ("tokens", real.scheduled_tokens, sim.scheduled_tokens),
        ("victims", set(real.preempted), set(sim.preempted)),
        ("cache hits", real.cached_tokens, sim.cached_tokens),
    ):
        if a != b:
            if isinstance(a, dict):
                diff = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
                return f"step {index}: {what} differ (vllm, simulator): {dict(itertools.islice(diff.items(), 4))}"
            return f"step {index}: {what} differ: vllm {sorted(a)[:6]} simulator {sorted(b)[:6]}"
    return f"step {index}: differs"


def replay_and_compare(
    config: ScaleConfig, decided: list[Decided], events: list
) -> tuple[int, int, str | None]:
    from vllm_shadow.evaluation.recorded_run import MirroredRun

    run = MirroredRun.from_events(events)
    finished = {r.request_id for r in run.finished_requests}
    requests = [r for r in run.requests if r.request_id in finished]
    result = simulate(
        requests,
        config.simulator_policy(),
        LinearCostModel(a=1e-3, b=0.0, c=0.0, d=0.0),
        num_kv_blocks=config.num_blocks,
        block_size=BLOCK_SIZE,
        record_steps=True,
        arrival_steps=run.arrival_steps,
    )
    sim_steps = result.steps or []
    identical = 0
    first = None
    for index, real in enumerate(decided):
        sim = sim_steps[index] if index < len(sim_steps) else None
        if sim is not None and _step_view(real) == _step_view(sim):
            identical += 1
        elif first is None:
            first = _describe(index, real, sim)
    if first is None and len(sim_steps) != len(decided):
        first = f"the simulator ran {len(sim_steps)} steps, vLLM {len(decided)}"
    return len(decided), identical, first


def compare(config: ScaleConfig, max_steps: int | None = None) -> Comparison:
    workload = load_workload(config)
    started = time.process_time()
    decided, events = drive(config, workload, max_steps)
    vllm_seconds = time.process_time() - started
    started = time.process_time()
    compared, identical, first = replay_and_compare(config, decided, events)
    return Comparison(
        config,
        compared,
        identical,
        sum(len(d.preempted) for d in decided),
        sum(sum(d.cached_tokens.values()) for d in decided),
        first,
        vllm_seconds,
        time.process_time() - started,
    )


# ---- the configurations and the table ------------------------------------------------------------------------


def configurations() -> list[ScaleConfig]:
    """Settings spanning GPU deployments, each with prefix caching off and on, sync and async; each run's
    arrival rate is set so that KV runs short."""
    base = [
        ScaleConfig("azure-conv", 4000, 256, 8192, requests_per_step=0.5),
        ScaleConfig("azure-conv", 2000, 128, 2048, long_prefill_token_threshold=512, requests_per_step=0.3),
        ScaleConfig("azure-conv", 20000, 1024, 16384, requests_per_step=2.0),
        ScaleConfig("azure-code", 6000, 256, 8192, policy="priority", requests_per_step=3.0),
        ScaleConfig("azure-code", 3000, 512, 4096, enable_chunked_prefill=False, requests_per_step=1.5),
        ScaleConfig("mooncake-conv", 50000, 512, 16384, requests_per_step=0.6),
        ScaleConfig("mooncake-conv", 8000, 128, 8192, policy="priority", requests_per_step=0.15),
        ScaleConfig(
            "shared-prompt", 1200, 256, 4096, long_prefill_token_threshold=1024, requests_per_step=1.5
        ),
        ScaleConfig("chat", 3000, 256, 8192, requests_per_step=0.4),
    ]
    return [
        dataclasses.replace(config, enable_prefix_caching=caching, async_scheduling=asynchronous)
        for config in base
        for caching in (False, True)
        for asynchronous in (False, True)
    ]


def _row(c: Comparison) -> str:
    share = f"{100 * c.steps_identical / c.steps_compared:.1f}%" if c.steps_compared else "-"
    return (
        f"| {c.config.label()} | {c.steps_compared:,} | {c.preemptions:,} | {c.hit_tokens:,} | {share} "
        f"| {c.first_divergence or '-'} |"
    )


def table(results: Sequence[Comparison]) -> str:
    lines = [
        "| configuration | steps | preemptions | cache-hit tokens | steps identical | first divergence |",
        "|---|---:|---:|---:|---:|---|",
        *(_row(c) for c in results),
    ]
    total = sum(c.steps_compared for c in results)
    same = sum(c.steps_identical for c in results)
    lines.append(
        f"| **all** | **{total:,}** | | | **{100 * same / max(total, 1):.2f}% ({same:,}/{total:,})** | |"
    )
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS-fidelity.md, keeping the other sections."""
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    head, _, rest = current.partition(SECTION)
    tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
    RESULTS.write_text(head.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + tail, encoding="utf-8")


def _to_json(c: Comparison) -> str:
    return json.dumps({**dataclasses.asdict(c), "config": dataclasses.asdict(c.config)})


def _from_json(line: str) -> Comparison:
    fields = json.loads(line)
    return Comparison(**{**fields, "config": ScaleConfig(**fields["config"])})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="arrivals stop after 3,000 steps; the run drains"
    )
    parser.add_argument("--only", type=int, nargs="*", help="configuration indices to run")
    parser.add_argument("--out", type=Path, help="append each configuration's result (a JSON line) here")
    parser.add_argument("--table-from", type=Path, nargs="*", help="write the table from these result files")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.table_from:
        lines = [line for path in args.table_from for line in path.read_text().splitlines() if line]
        results = [_from_json(line) for line in lines]
        order = {config: i for i, config in enumerate(configurations())}
        results.sort(key=lambda c: order.get(c.config, len(order)))
    else:
        configs = configurations()
        if args.only is not None:
            configs = [configs[i] for i in args.only]
        results = []
        for config in configs:
            result = compare(config, max_steps=3000 if args.quick else None)
            results.append(result)
            print(_row(result), f"({result.vllm_seconds:.0f} s vLLM, {result.replay_seconds:.1f} s replay)")
            if args.out:
                with args.out.open("a", encoding="utf-8") as out:
                    out.write(_to_json(result) + "\n")
            sys.stdout.flush()
    text = table(results)
    print(text)
    if not args.no_write:
        write_results(f"{SECTION}\n\n{HEADER}\n\n{text}\n")
    return 0 if all(c.steps_identical == c.steps_compared for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
