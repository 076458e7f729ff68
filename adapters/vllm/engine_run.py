"""Run a real vLLM engine on a workload of `RequestArrival`s: the bundled tiny Llama, trace-driven arrivals.

Used by the fidelity tests and the hook-overhead benchmark. The engine runs the CPU build of vLLM with random
weights (`load_format="dummy"`), token-id prompts and `ignore_eos`, so every request produces exactly its
`output_tokens`. Engines start in a spawned process: callers need an `if __name__ == "__main__":` guard.

The same engine also runs as vLLM's OpenAI-compatible server (`EngineSetup.serve_command`), driven by vLLM's
own load client (`vllm bench serve`); `write_bench_dataset` turns a trace into that client's custom dataset.
The bundled model ships a word-level tokenizer (build_tokenizer.py beside it) so both run offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.vllm.prefix_workloads import PromptedRequest

TINY_LLAMA = Path(__file__).resolve().parent.parent / "data" / "tiny-llama"
CPU_BLOCK_SIZE = 128  # vLLM's KV block size on the CPU platform


@dataclass(frozen=True, slots=True)
class EngineSetup:
    """The engine arguments a run varies; everything else is fixed for a small, reproducible CPU engine."""

    num_kv_blocks: int = 24  # vLLM's num_gpu_blocks_override: total blocks, the null block included
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    max_model_len: int = 2048
    scheduler_cls: str | None = "vllm_shadow.MirrorScheduler"  # None = vLLM's stock scheduler
    # On CPU this is the fraction of the NUMA node's memory that must be FREE at start-up (vLLM checks it);
    # the KV cache itself is pinned by num_kv_blocks. 0.2 lets a few engines (or test sessions) coexist.
    memory_fraction: float = 0.2
    model: Path = TINY_LLAMA

    def engine_args(self) -> Any:
        from vllm import EngineArgs

        return EngineArgs(
            model=str(self.model),
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            gpu_memory_utilization=self.memory_fraction,
            num_gpu_blocks_override=self.num_kv_blocks,
            max_model_len=min(self.max_model_len, (self.num_kv_blocks - 1) * CPU_BLOCK_SIZE),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            scheduling_policy=self.policy,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enable_prefix_caching=self.enable_prefix_caching,
            scheduler_cls=self.scheduler_cls,
            seed=0,
        )


def serve_command(setup: EngineSetup, port: int, host: str = "127.0.0.1") -> list[str]:
    """`vllm serve` of `setup` on host:port, as the CPU build runs it (see adapters.vllm.cpu_cli).

    Same engine as `start_engine`, except that the server tokenizes text prompts with the model's tokenizer.
    """
    flag = {True: "--", False: "--no-"}
    command = [
        sys.executable, "-m", "vllm_shadow.adapters.vllm.cpu_cli", "serve", str(setup.model),
        "--host", host, "--port", str(port),
        "--load-format", "dummy", "--enforce-eager", "--seed", "0",
        "--gpu-memory-utilization", str(setup.memory_fraction),
        "--num-gpu-blocks-override", str(setup.num_kv_blocks),
        "--max-model-len", str(min(setup.max_model_len, (setup.num_kv_blocks - 1) * CPU_BLOCK_SIZE)),
        "--max-num-seqs", str(setup.max_num_seqs),
        "--max-num-batched-tokens", str(setup.max_num_batched_tokens),
        "--scheduling-policy", setup.policy,
        "--long-prefill-token-threshold", str(setup.long_prefill_token_threshold),
        f"{flag[setup.enable_chunked_prefill]}enable-chunked-prefill",
        f"{flag[setup.enable_prefix_caching]}enable-prefix-caching",
    ]  # fmt: skip
    if setup.scheduler_cls:
        command += ["--scheduler-cls", setup.scheduler_cls]
    return command


def write_bench_dataset(requests: Sequence[RequestArrival], path: Path) -> Path:
    """A `vllm bench serve --dataset-name custom` file (JSON lines of `prompt`, `output_tokens`) from a trace.

    Each prompt is `prompt_tokens` words of the tiny model's tokenizer, so it is exactly that many tokens;
    run the client with `--skip-chat-template --custom-output-len -1 --disable-shuffle --ignore-eos`.
    """
    with path.open("w", encoding="utf-8") as out:
        for i, r in enumerate(requests):
            # Filler words of build_tokenizer.py's vocabulary: one token each, whatever their neighbours.
            prompt = " ".join(f"w{(i * 7 + j) % 20000:05d}" for j in range(r.prompt_tokens))
            out.write(json.dumps({"prompt": prompt, "output_tokens": r.output_tokens or 1}) + "\n")
    return path


def start_engine(setup: EngineSetup, stat_loggers: Sequence[Any] | None = None, **overrides: Any) -> Any:
    """A `vllm.LLMEngine` for `setup`; `overrides` are extra EngineArgs fields (e.g. otlp_traces_endpoint)."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm import LLMEngine

    args = setup.engine_args()
    for name, value in overrides.items():
        setattr(args, name, value)
    return LLMEngine.from_engine_args(args, stat_loggers=list(stat_loggers) if stat_loggers else None)


def stop_engine(engine: Any) -> None:
    engine.engine_core.shutdown()


def trace_workload(
    requests: Sequence[RequestArrival],
    *,
    prompt_scale: float = 0.25,
    output_scale: float = 0.5,
    max_prompt_tokens: int = 1000,
    max_output_tokens: int = 128,
    seconds: float = 1.0,
    priorities: int = 0,
) -> list[RequestArrival]:
    """Scale a real trace to the tiny engine: shorter prompts and outputs, arrivals squeezed into `seconds`.

    Sizes keep their spread (a long prompt stays long) while a few dozen requests finish in seconds on a CPU.
    `priorities` > 0 sets priority = index mod `priorities`, for vLLM's priority policy (traces carry none).
    """
    if not requests:
        return []
    t0 = requests[0].time
    span = (requests[-1].time - t0) or 1.0
    scaled = []
    for i, r in enumerate(requests):
        output = r.output_tokens or 1
        scaled.append(
            dataclasses.replace(
                r,
                time=(r.time - t0) / span * seconds,
                prompt_tokens=max(1, min(max_prompt_tokens, round(r.prompt_tokens * prompt_scale))),
                output_tokens=max(1, min(max_output_tokens, round(output * output_scale))),
                priority=i % priorities if priorities else 0,
            )
        )
    return scaled


def drive(engine: Any, requests: Sequence[RequestArrival], *, id_prefix: str = "") -> dict[str, int]:
    """Submit each request at its `time` (seconds from now) and step until all finish.

    Returns output tokens produced per request id (external ids, with `id_prefix`). Prompts are token ids
    (one token id repeated: random weights make content irrelevant to scheduling).
    """
    pending = sorted(requests, key=lambda r: r.time)
    prompted = [PromptedRequest(r, (100 + i % 1000,) * r.prompt_tokens) for i, r in enumerate(pending)]
    return drive_prompts(engine, prompted, id_prefix=id_prefix)


def drive_prompts(engine: Any, requests: Sequence[PromptedRequest], *, id_prefix: str = "") -> dict[str, int]:
    """Submit each request with its own prompt token ids, at its `time` (seconds from now, or from the finish
    of the request it comes `after`), and step until all finish. Returns output tokens per request id."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    followers: dict[str, list[PromptedRequest]] = {}
    for r in requests:
        if r.after is not None:
            followers.setdefault(id_prefix + r.after, []).append(r)
    start = time.monotonic()
    # (when, order, request): order keeps equal times in submission order
    pending = sorted(((r.arrival.time, i, r) for i, r in enumerate(requests) if r.after is None), key=_first2)
    produced: dict[str, int] = {}
    prompts: dict[str, list[int]] = {}  # what each request was sent, and what the engine generated
    outputs: dict[str, list[int]] = {}
    order = len(requests)
    while pending or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while pending and pending[0][0] <= now:
            r = pending.pop(0)[2]
            params = SamplingParams(max_tokens=r.arrival.output_tokens, ignore_eos=True, detokenize=False)
            tokens = list(r.prompt_token_ids)
            if r.after_output:  # the previous turn's prompt and what the engine answered, then this turn's
                assert r.after is not None
                tokens = prompts[id_prefix + r.after] + outputs[id_prefix + r.after] + tokens
            request_id = id_prefix + r.arrival.request_id
            prompts[request_id] = tokens
            prompt = TokensPrompt(prompt_token_ids=tokens)
            engine.add_request(request_id, prompt, params, priority=r.arrival.priority)
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    produced[out.request_id] = len(out.outputs[0].token_ids)
                    if out.request_id in followers:
                        outputs[out.request_id] = list(out.outputs[0].token_ids)
                    finished_at = time.monotonic() - start
                    for follower in followers.pop(out.request_id, ()):
                        pending.append((finished_at + follower.arrival.time, order, follower))
                        order += 1
                    pending.sort(key=_first2)
        elif pending:
            time.sleep(max(0.0, pending[0][0] - (time.monotonic() - start)))
    return produced


def _first2(entry: tuple[float, int, PromptedRequest]) -> tuple[float, int]:
    return entry[0], entry[1]
