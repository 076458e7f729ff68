"""The batch compositions a profile times: one step's shape, its kind, and the jittered grid over the axes a
step's time depends on (new tokens, cached context, number of requests)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.linear import BatchFeatures, batch_features

PREFILL_HEAVY, DECODE_HEAVY, MIXED = "prefill-heavy", "decode-heavy", "mixed"
BATCH_KINDS = (PREFILL_HEAVY, DECODE_HEAVY, MIXED)


@dataclass(frozen=True, slots=True)
class BatchShape:
    """One step's composition: (new tokens, cached context tokens) of each request, in request order."""

    requests: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("a batch needs at least one request")
        for new, ctx in self.requests:
            if new < 1 or ctx < 0:
                raise ValueError(f"a request needs new >= 1 and context >= 0, got ({new}, {ctx})")

    @property
    def new_tokens(self) -> list[int]:
        return [new for new, _ in self.requests]

    @property
    def context_tokens(self) -> list[int]:
        return [ctx for _, ctx in self.requests]

    @property
    def kind(self) -> str:
        """Prefill-heavy without decodes, decode-heavy without prefill chunks, mixed with both. A request with
        one new token counts as a decode, as it does in `batch_features`."""
        decodes = sum(new == 1 for new, _ in self.requests)
        if decodes == len(self.requests):
            return DECODE_HEAVY
        return PREFILL_HEAVY if decodes == 0 else MIXED

    @property
    def features(self) -> BatchFeatures:
        return batch_features(self.new_tokens, self.context_tokens)

    def to_runs(self) -> list[list[int]]:
        """Run-length form, [new, context, count] per run of equal requests: a 256-request decode batch at
        one context length is one run, which keeps profile files small."""
        runs: list[list[int]] = []
        for new, ctx in self.requests:
            if runs and runs[-1][:2] == [new, ctx]:
                runs[-1][2] += 1
            else:
                runs.append([new, ctx, 1])
        return runs

    @classmethod
    def from_runs(cls, runs: Sequence[Sequence[int]]) -> BatchShape:
        return cls(tuple((int(new), int(ctx)) for new, ctx, count in runs for _ in range(int(count))))


def batch_grid(
    arch: ModelArchitecture,
    *,
    max_batched_tokens: int = 2048,
    max_context: int = 4096,
    max_decodes: int = 256,
    seed: int = 0,
) -> list[BatchShape]:
    """A jittered grid over the axes a step's time depends on. Each grid cell is a range (a power of two
    wide for token and request counts, of four for context lengths) and contributes one batch drawn
    log-uniformly inside it: the grid covers every combination of the axes, and its batches hardly ever
    repeat a value, so a hold-out fold does not test on copies of training points.
      decode-heavy   number of decodes x context length, alternately all at one context and spread over the
                     cell (padding and per-request variation both show up);
      prefill-heavy  chunk tokens x cached context; chunks from scratch alternate between 1, 2 and 4
                     prompts sharing the tokens (newly arrived prompts are batched together);
      mixed          one prefill chunk x number of decodes, at random context lengths.
    Every batch stays within `max_batched_tokens` new tokens, `max_decodes` requests besides the chunk, and
    `max_context` tokens per request (capped by the model's positions and sliding window, so attention over
    the whole cache is exact)."""
    max_context = min(max_context, arch.max_position_embeddings, arch.sliding_window or max_context)
    if max_batched_tokens < 32 or max_context < 64 or max_decodes < 1:
        raise ValueError("the grid needs max_batched_tokens >= 32, max_context >= 64 and max_decodes >= 1")
    rng = np.random.default_rng(seed)

    def draw(low: float, high: float) -> int:
        """An integer in [low, high], log-uniform."""
        low, high = max(1.0, low), max(1.0, low, high)
        return min(int(high), int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))

    def levels(start: int, factor: int, limit: int) -> Iterator[int]:
        level = start
        while level <= limit:
            yield level
            level *= factor

    batches: list[BatchShape] = []
    context_levels = list(levels(16, 4, max_context // 4))
    for i, size in enumerate(levels(1, 2, max_decodes)):
        for j, ctx_level in enumerate(context_levels):
            count = draw(size, min(2 * size - 1, max_decodes))
            top = min(4 * ctx_level - 1, max_context - 1)
            spread = (i + j) % 2 == 1
            contexts = (
                [draw(ctx_level, top) for _ in range(count)] if spread else [draw(ctx_level, top)] * count
            )
            batches.append(BatchShape(tuple((1, ctx) for ctx in contexts)))

    for i, chunk_level in enumerate(levels(16, 2, max_batched_tokens)):
        for j, ctx_level in enumerate([0, *levels(64, 4, max_context // 2)]):
            if ctx_level + chunk_level > max_context:
                continue
            tokens = draw(chunk_level, min(2 * chunk_level - 1, max_batched_tokens, max_context - ctx_level))
            if ctx_level == 0:
                prompts = (1, 2, 4)[(i + j) % 3]
                sizes = [tokens // prompts + (k < tokens % prompts) for k in range(prompts)]
                batches.append(BatchShape(tuple((n, 0) for n in sizes)))
            else:
                ctx = draw(ctx_level, min(4 * ctx_level - 1, max_context - tokens))
                batches.append(BatchShape(((tokens, ctx),)))

    for chunk_level in levels(32, 2, max_batched_tokens // 2):
        for decode_level in levels(2, 4, max_decodes):
            count = draw(
                decode_level, min(4 * decode_level - 1, max_decodes, max_batched_tokens - chunk_level)
            )
            tokens = draw(chunk_level, min(2 * chunk_level - 1, max_batched_tokens - count))
            from_scratch = rng.random() < 0.5 or max_context - tokens < 64
            chunk_ctx = 0 if from_scratch else draw(64, max_context - tokens)
            ctx_base = draw(16, max_context // 2)
            decodes = [(1, draw(ctx_base, min(2 * ctx_base, max_context - 1))) for _ in range(count)]
            batches.append(BatchShape(((tokens, chunk_ctx), *decodes)))
    return batches
