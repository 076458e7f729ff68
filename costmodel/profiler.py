"""Measured batch step times: a random-weight model built from a Hugging Face config, timed with torch.

`run_profile` builds the model of an architecture with a few of its decoder layers, times its forward pass
over a jittered grid of batch compositions (prefill chunks, decode batches, chunked-prefill mixes; short to
long contexts), scales the times to the full layer count, fits the linear model and reports its hold-out error
per kind of batch, beside the roofline prior's and that of INFERMAX's form without the per-request term (what
that term buys on this device). `refit_profile_run` refits a saved profile to the measurements it carries.

What one timed step is, and why:
  - The layers are vLLM's Llama-family layer in plain torch: fused QKV projection, rotary embedding, the new
    tokens' K and V written into a KV cache, grouped-query attention over the cache with
    `scaled_dot_product_attention`, fused gate-up SwiGLU MLP, RMSNorm before each; then the final norm, the
    LM head for each request's last position only (vLLM computes no other logits) and greedy sampling.
  - Attention reads a per-request cache slot, as paged attention reads a request's blocks. Each prefill
    chunk is one attention call over its cached context plus itself. Decodes are batched into one call per
    group of similar context lengths, padded to the group's longest (see `_decode_groups`), since
    torch has no varlen decode kernel on every device and one call per request would time Python instead.
  - Only `layers` decoder layers are built: the layers are identical, so the step time of the full model is
    the measured step plus (num_layers / layers - 1) times the measured time of the layers alone.
  - Timed: from token ids on the device to sampled token ids. Not timed: the engine's scheduling and input
    preparation on the CPU, which online calibration adds through the intercept.
  - Eager mode throughout: on a GPU, small decode steps are launch-bound here where vLLM replays CUDA
    graphs, so a GPU profile overstates them (the calibrator corrects that from the engine's own steps).
  - Repetitions are median-timed after warm-up runs of the same shape, in the device's own time (CUDA
    events on a GPU; on a CPU, the thread's CPU time when torch runs one thread: see `_Stopwatch`), and
    shapes are measured in a shuffled order so that slow drift in the machine's load spreads over the grid
    instead of lining up with one of its axes.
Mixture-of-experts models are refused: an eager loop over experts would time Python, not a fused MoE kernel.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.hardware import Hardware
from vllm_shadow.costmodel.linear import BatchFeatures, LinearCostModel, batch_features, fit_linear
from vllm_shadow.costmodel.profile import CostProfile, fit_profile

PREFILL_HEAVY, DECODE_HEAVY, MIXED = "prefill-heavy", "decode-heavy", "mixed"
BATCH_KINDS = (PREFILL_HEAVY, DECODE_HEAVY, MIXED)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A padded decode group attends at most this fraction more keys than its requests' contexts, or this many.
DECODE_PADDING, DECODE_PADDING_KEYS = 0.25, 1024
_RMS_EPS = 1e-5
_ROPE_THETA = 10000.0  # not in ModelArchitecture, and it changes values, not time
_WEIGHT_STD = 0.02


# ---- batch compositions


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


# ---- the model


@dataclass(frozen=True, slots=True)
class _LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True, slots=True)
class KVCache:
    """Per built layer, K and V of shape (slots, kv heads, positions, head_dim): a request owns a slot."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def positions(self) -> int:
        return self.keys[0].shape[2]


@dataclass(frozen=True, slots=True)
class _Prefill:
    """A request with several new tokens: flat tokens [start, start + new), cache positions
    [context, context + new) of its slot; `mask` is None from scratch (plain causal attention)."""

    slot: int
    start: int
    new: int
    context: int
    mask: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class _DecodeGroup:
    """Decodes in consecutive slots and flat tokens, attending over `keys` padded positions; `mask` (count, 1,
    1, keys) hides the padding, None when every request has exactly `keys` positions."""

    first_slot: int
    start: int
    count: int
    keys: int
    mask: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step, laid out flat as an engine lays it out: prefill tokens first, then the decodes sorted by
    context length. `last_token[i]` is the flat index of request i's last new token and `slots[i]` its cache
    slot, both in the batch's request order."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    prefills: tuple[_Prefill, ...]
    decode_groups: tuple[_DecodeGroup, ...]
    decode_slots: torch.Tensor  # cache slot and write position of each decode, in flat order
    decode_positions: torch.Tensor
    last_token: torch.Tensor
    slots: tuple[int, ...]


def check_supported(arch: ModelArchitecture) -> None:
    """Refuse what plain torch cannot time faithfully: a mixture of experts needs a fused MoE kernel, and an
    eager loop over experts would time Python."""
    if arch.num_experts > 1:
        raise ValueError(
            f"{arch.name} is a mixture of experts: profiling it needs a fused MoE kernel, which plain torch "
            "does not have (an eager loop over experts would time Python)"
        )


class RandomWeightModel:
    """A decoder-only model with `arch`'s shapes, random weights, and `layers` of its decoder layers."""

    def __init__(
        self,
        arch: ModelArchitecture,
        layers: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> None:
        check_supported(arch)
        if layers < 1:
            raise ValueError(f"build at least one decoder layer, got {layers}")
        self.arch, self.layers, self.dtype = arch, layers, dtype
        self.device = torch.device(device)
        self._generator = torch.Generator(self.device).manual_seed(seed)
        hidden, head_dim = arch.hidden_size, arch.head_dim
        self._q_width = arch.num_heads * head_dim
        self._kv_width = arch.num_kv_heads * head_dim
        qkv_width = self._q_width + 2 * self._kv_width
        self.embedding = self._random(arch.vocab_size, hidden)
        self.layer_weights = tuple(
            _LayerWeights(
                input_norm=self._ones(hidden),
                qkv=self._random(qkv_width, hidden),
                qkv_bias=self._random(qkv_width) if arch.qkv_bias else None,
                o=self._random(hidden, self._q_width),
                o_bias=self._random(hidden) if arch.o_bias else None,
                post_norm=self._ones(hidden),
                gate_up=self._random(2 * arch.intermediate_size, hidden),
                down=self._random(hidden, arch.intermediate_size),
            )
            for _ in range(layers)
        )
        self.final_norm = self._ones(hidden)
        self.lm_head = self.embedding if arch.tie_word_embeddings else self._random(arch.vocab_size, hidden)
        # vLLM's rotary cache: cos and sin per position, gathered by position in the forward pass.
        inv_freq = _ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=self.device) / head_dim)
        angles = torch.outer(torch.arange(arch.max_position_embeddings, device=self.device), inv_freq)
        self._cos, self._sin = angles.cos().to(dtype), angles.sin().to(dtype)

    # -- setup, outside any timed region

    def allocate_cache(self, slots: int, positions: int) -> KVCache:
        """A cache of random values (the values do not change the time; uninitialised memory could hold
        NaNs or denormals, which can)."""
        shape = (slots, self.arch.num_kv_heads, positions, self.arch.head_dim)
        keys = tuple(self._uniform(shape) for _ in range(self.layers))
        values = tuple(self._uniform(shape) for _ in range(self.layers))
        return KVCache(keys, values)

    def prepare(
        self, batch: BatchShape, token_ids: Sequence[int] | None = None, *, first_slot: int = 0
    ) -> StepInputs:
        """Device tensors for one step of `batch`. Requests take consecutive slots from `first_slot`: the
        prefills in order, then the decodes by context length, so that every decode group is a slice of the
        cache. `token_ids` (flat, in request order) default to random ones."""
        total = sum(batch.new_tokens)
        if token_ids is None:
            ids = torch.randint(
                0, self.arch.vocab_size, (total,), generator=self._generator, device=self.device
            )
        elif len(token_ids) != total:
            raise ValueError(f"{len(token_ids)} token ids for a batch of {total} new tokens")
        else:
            ids = torch.tensor(list(token_ids), device=self.device)
        offsets = np.concatenate([[0], np.cumsum(batch.new_tokens)])
        prefill_order = [i for i, (new, _) in enumerate(batch.requests) if new > 1]
        decode_order = sorted(
            (i for i, (new, _) in enumerate(batch.requests) if new == 1), key=lambda i: batch.requests[i][1]
        )
        order = prefill_order + decode_order

        flat_ids, positions, prefills = [], [], []
        slots, last_token = [0] * len(order), [0] * len(order)
        start = 0
        for rank, i in enumerate(order):
            new, ctx = batch.requests[i]
            slots[i], last_token[i] = first_slot + rank, start + new - 1
            flat_ids.append(ids[int(offsets[i]) : int(offsets[i]) + new])
            positions.append(torch.arange(ctx, ctx + new, device=self.device))
            if new > 1:
                mask = None
                if ctx:  # query r sits at position ctx + r and sees keys 0 .. ctx + r
                    mask = torch.ones(new, ctx + new, dtype=torch.bool, device=self.device).tril(ctx)
                prefills.append(_Prefill(first_slot + rank, start, new, ctx, mask))
            start += new

        decode_contexts = [batch.requests[i][1] for i in decode_order]
        groups = []
        for first, last in _decode_groups([ctx + 1 for ctx in decode_contexts]):
            keys = decode_contexts[last - 1] + 1
            lengths = torch.tensor([ctx + 1 for ctx in decode_contexts[first:last]], device=self.device)
            mask = None
            if int(lengths.min()) != keys:
                mask = (torch.arange(keys, device=self.device) < lengths[:, None]).view(-1, 1, 1, keys)
            rank = len(prefill_order) + first
            groups.append(
                _DecodeGroup(first_slot + rank, start - len(decode_order) + first, last - first, keys, mask)
            )
        first_decode_slot = first_slot + len(prefill_order)
        return StepInputs(
            token_ids=torch.cat(flat_ids),
            positions=torch.cat(positions),
            prefills=tuple(prefills),
            decode_groups=tuple(groups),
            decode_slots=torch.arange(
                first_decode_slot, first_decode_slot + len(decode_order), device=self.device
            ),
            decode_positions=torch.tensor(decode_contexts, dtype=torch.long, device=self.device),
            last_token=torch.tensor(last_token, device=self.device),
            slots=tuple(slots),
        )

    # -- the forward pass, in the three parts the timer brackets

    def embed(self, step: StepInputs) -> torch.Tensor:
        return F.embedding(step.token_ids, self.embedding)

    def run_layers(self, hidden: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        arch = self.arch
        cos, sin = self._cos[step.positions].unsqueeze(1), self._sin[step.positions].unsqueeze(1)
        tokens = hidden.shape[0]
        for w, k_cache, v_cache in zip(self.layer_weights, cache.keys, cache.values, strict=True):
            x = F.rms_norm(hidden, (arch.hidden_size,), w.input_norm, _RMS_EPS)
            q, k, v = F.linear(x, w.qkv, w.qkv_bias).split(
                [self._q_width, self._kv_width, self._kv_width], -1
            )
            q = _rotate(q.view(tokens, arch.num_heads, arch.head_dim), cos, sin)
            k = _rotate(k.view(tokens, arch.num_kv_heads, arch.head_dim), cos, sin)
            v = v.view(tokens, arch.num_kv_heads, arch.head_dim)
            attention = self._attention(q, k, v, step, k_cache, v_cache)
            hidden = hidden + F.linear(attention.reshape(tokens, self._q_width), w.o, w.o_bias)
            x = F.rms_norm(hidden, (arch.hidden_size,), w.post_norm, _RMS_EPS)
            gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w.down)
        return hidden

    def logits(self, hidden: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Logits of each request's last position, in request order."""
        hidden = F.rms_norm(hidden, (self.arch.hidden_size,), self.final_norm, _RMS_EPS)
        return F.linear(hidden[step.last_token], self.lm_head)

    def forward(self, step: StepInputs, cache: KVCache) -> torch.Tensor:
        return self.logits(self.run_layers(self.embed(step), step, cache), step)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)  # greedy sampling stands in for the engine's sampler

    # -- internals

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        step: StepInputs,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Write the new K and V into the cache, then attend over it; returns (tokens, heads, head_dim)."""
        outputs = []
        for p in step.prefills:
            k_cache[p.slot, :, p.context : p.context + p.new] = k[p.start : p.start + p.new].transpose(0, 1)
            v_cache[p.slot, :, p.context : p.context + p.new] = v[p.start : p.start + p.new].transpose(0, 1)
            query = q[p.start : p.start + p.new].transpose(0, 1).unsqueeze(0)
            keys = k_cache[p.slot : p.slot + 1, :, : p.context + p.new]
            values = v_cache[p.slot : p.slot + 1, :, : p.context + p.new]
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True
            )
            outputs.append(out.squeeze(0).transpose(0, 1))
        if step.decode_groups:
            first = step.decode_groups[0].start
            # One scatter for all decodes, as vLLM's reshape_and_cache writes every new token at once.
            k_cache[step.decode_slots, :, step.decode_positions] = k[first:]
            v_cache[step.decode_slots, :, step.decode_positions] = v[first:]
            for g in step.decode_groups:
                slots = slice(g.first_slot, g.first_slot + g.count)
                out = F.scaled_dot_product_attention(
                    q[g.start : g.start + g.count].unsqueeze(2),
                    k_cache[slots, :, : g.keys],
                    v_cache[slots, :, : g.keys],
                    attn_mask=g.mask,
                    enable_gqa=True,
                )
                outputs.append(out.squeeze(2))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _random(self, *shape: int) -> torch.Tensor:
        weights = torch.empty(shape, dtype=self.dtype, device=self.device)
        return weights.normal_(0.0, _WEIGHT_STD, generator=self._generator)

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device).uniform_(
            -1, 1, generator=self._generator
        )

    def _ones(self, size: int) -> torch.Tensor:
        return torch.ones(size, dtype=self.dtype, device=self.device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Llama's rotate-half form; x is (tokens, heads, head_dim), cos and sin are
    (tokens, 1, head_dim / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _decode_groups(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[first, last) ranges of ascending attention lengths, each attended by one call padded to its longest.
    A group grows while its padding stays within DECODE_PADDING of the keys its requests really attend, or
    within DECODE_PADDING_KEYS keys: one more call costs about as much as that many keys (some 30 us against
    some 60 ns a key a layer on a CPU core), so merging short contexts saves more than the padding wastes."""
    groups: list[tuple[int, int]] = []
    first, attended = 0, 0
    for i, length in enumerate(lengths):
        attended += length
        padding = length * (i + 1 - first) - attended
        if padding > max(DECODE_PADDING * attended, DECODE_PADDING_KEYS):
            groups.append((first, i))
            first, attended = i, length
    if lengths:
        groups.append((first, len(lengths)))
    return groups


# ---- timing


@dataclass(frozen=True, slots=True)
class Timing:
    """Per repetition: seconds of the whole forward pass of the built layers, and of the layers alone."""

    total_s: tuple[float, ...]
    layers_s: tuple[float, ...]

    def scaled_s(self, layer_factor: float) -> tuple[float, ...]:
        """Per repetition, the step time of a model with `layer_factor` times the built layers: the layers
        are identical, so each further copy costs what the built ones cost on average."""
        extra = layer_factor - 1.0
        return tuple(
            total + extra * layers for total, layers in zip(self.total_s, self.layers_s, strict=True)
        )


class _Stopwatch:
    """Timestamps in the clock that gives the device's own time for a step:
    GPU                   CUDA events: kernels run asynchronously, so a host clock would time launches;
    CPU, one torch thread the thread's CPU time: torch returns when the work is done, and the CPU time
                          leaves out the time other processes hold the core (which doubles wall times on a
                          loaded machine) while keeping the step's own memory stalls and page faults;
    CPU, several threads  wall time, since the other threads' work is not in the caller's CPU time. It
                          needs an idle machine: one descheduled thread stalls every barrier of a parallel
                          kernel (wall times 10-40x the idle ones were seen on a loaded 2-core machine).
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._cpu_time = not self._cuda and torch.get_num_threads() == 1
        self.name = "CUDA events" if self._cuda else "thread CPU time" if self._cpu_time else "wall clock"

    def mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.thread_time() if self._cpu_time else time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start

    def synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def time_step(
    model: RandomWeightModel, step: StepInputs, cache: KVCache, *, warmup: int = 2, repeats: int = 5
) -> Timing:
    """Time `repeats` runs of one step after `warmup` untimed ones (kernel selection, allocator and cache
    warm-up happen there)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    clock = _Stopwatch(model.device)
    total, layers = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model.sample(model.forward(step, cache))
        clock.synchronize()
        for _ in range(repeats):
            start = clock.mark()
            hidden = model.embed(step)
            layers_start = clock.mark()
            hidden = model.run_layers(hidden, step, cache)
            layers_end = clock.mark()
            model.sample(model.logits(hidden, step))
            end = clock.mark()
            clock.synchronize()
            total.append(clock.seconds(start, end))
            layers.append(clock.seconds(layers_start, layers_end))
    return Timing(tuple(total), tuple(layers))


@dataclass(frozen=True, slots=True)
class Measurement:
    batch: BatchShape
    seconds: float  # median over repetitions of the step time scaled to the full layer count
    repeats_s: tuple[float, ...]  # each repetition's scaled step time: the spread shows the noise

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.batch.to_runs(),
            "kind": self.batch.kind,
            "seconds": _significant(self.seconds),
            "repeats_s": [_significant(s) for s in self.repeats_s],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            BatchShape.from_runs(data["requests"]),
            float(data["seconds"]),
            tuple(float(s) for s in data["repeats_s"]),
        )


def measure(
    model: RandomWeightModel,
    batches: Sequence[BatchShape],
    *,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Measurement]:
    """Step times of `batches` (in their order), scaled from the built layers to the architecture's count.
    One cache of the largest slot count and length serves every batch, so memory stays at the largest
    batch's footprint."""
    if not batches:
        return []
    cache = model.allocate_cache(
        max(len(b.requests) for b in batches), max(new + ctx for b in batches for new, ctx in b.requests)
    )
    factor = model.arch.num_layers / model.layers
    results: list[Measurement | None] = [None] * len(batches)
    for done, i in enumerate(np.random.default_rng(seed).permutation(len(batches)), start=1):
        timing = time_step(model, model.prepare(batches[i]), cache, warmup=warmup, repeats=repeats)
        scaled = timing.scaled_s(factor)
        results[i] = Measurement(batches[i], statistics.median(scaled), scaled)
        if progress is not None:
            progress(done, len(batches))
    return [m for m in results if m is not None]


# ---- validation


@dataclass(frozen=True, slots=True)
class KindErrors:
    """Mean absolute percentage errors on one kind of batch (or "all"): the fitted model on the samples it
    was fitted to and on held-out ones; INFERMAX's form (no per-request term) on held-out ones; and the
    roofline prior, fitted to no measurement at all."""

    kind: str
    samples: int
    fit_mape: float
    holdout_mape: float
    without_request_term_holdout_mape: float  # the fit forced to e = 0, hold-out: what e buys here
    prior_mape: float | None
    prior_bias: float | None  # mean signed relative error; positive: the prior predicts too slow


def feature_matrix(batches: Sequence[BatchShape]) -> np.ndarray:
    """(n, 4) rows of the batches' (T, K, P, R), as `LinearCostModel.predict` and `fit_linear` take them."""
    return np.array([b.features for b in batches], dtype=float).reshape(-1, len(BatchFeatures._fields))


def holdout_errors(
    features: np.ndarray,
    times: np.ndarray,
    *,
    with_request_term: bool | None = None,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Each batch's relative error |predicted - measured| / measured under a fit that did not see it: k-fold
    over the (T, K, P, R) `features`, with the folds of `cross_validated_mape` (so the mean is the profile's
    hold-out MAPE under the same `with_request_term`)."""
    order = np.random.default_rng(seed).permutation(len(times))
    errors = np.empty(len(times))
    for held_out in np.array_split(order, folds):
        train = np.setdiff1d(order, held_out)
        model = fit_linear(features[train], times[train], with_request_term=with_request_term)
        errors[held_out] = np.abs(model.predict(features[held_out]) - times[held_out]) / times[held_out]
    return errors


def kind_errors(
    measurements: Sequence[Measurement],
    fitted: LinearCostModel,
    prior: LinearCostModel | None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> list[KindErrors]:
    """Errors per batch kind present, then over all batches."""
    features = feature_matrix([m.batch for m in measurements])
    times = np.array([m.seconds for m in measurements])
    kinds = np.array([m.batch.kind for m in measurements])
    fit = np.abs(fitted.predict(features) - times) / times
    held_out = holdout_errors(features, times, folds=folds, seed=seed)
    without_e = holdout_errors(features, times, with_request_term=False, folds=folds, seed=seed)
    signed_prior = None if prior is None else (prior.predict(features) - times) / times
    rows = []
    for kind in [*(k for k in BATCH_KINDS if k in kinds), "all"]:
        chosen = kinds == kind if kind != "all" else np.ones(len(times), dtype=bool)
        rows.append(
            KindErrors(
                kind=kind,
                samples=int(chosen.sum()),
                fit_mape=float(fit[chosen].mean()),
                holdout_mape=float(held_out[chosen].mean()),
                without_request_term_holdout_mape=float(without_e[chosen].mean()),
                prior_mape=None if signed_prior is None else float(np.abs(signed_prior[chosen]).mean()),
                prior_bias=None if signed_prior is None else float(signed_prior[chosen].mean()),
            )
        )
    return rows


# ---- a whole profile


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    device: str = "cpu"
    dtype: str = "bfloat16"
    layers: int | None = None  # decoder layers to build; None: min(4, the model's)
    # CPU only. One thread by default: its CPU time is a step's own time even on a shared machine (see
    # _Stopwatch); more threads model a multi-threaded CPU engine but need the machine to themselves.
    threads: int = 1
    warmup: int = 2
    repeats: int = 5
    max_batched_tokens: int = 2048
    max_context: int = 4096
    max_decodes: int = 256
    seed: int = 0

    def layers_for(self, arch: ModelArchitecture) -> int:
        return min(4 if self.layers is None else self.layers, arch.num_layers)


@dataclass(frozen=True, slots=True)
class ProfileRun:
    profile: CostProfile
    measurements: tuple[Measurement, ...]
    errors: tuple[KindErrors, ...]
    prior: LinearCostModel | None
    prior_hardware: str | None
    settings: ProfileSettings


def run_profile(
    arch: ModelArchitecture,
    settings: ProfileSettings | None = None,
    *,
    hardware: Hardware | None = None,
    prior: LinearCostModel | None = None,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ProfileRun:
    """Measure `arch` on the settings' device, fit the linear model, and validate it and the `prior` (the
    roofline prior of `hardware`, when given) per batch kind. The profile is named after `hardware` when
    given, else after the device."""
    settings = settings or ProfileSettings()
    if settings.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {settings.dtype!r}; supported: {', '.join(DTYPES)}")
    if settings.threads < 1:
        raise ValueError(f"threads must be at least 1, got {settings.threads}")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda, but torch sees no CUDA device")
    layers = settings.layers_for(arch)
    settings = replace(settings, layers=layers)  # recorded as resolved
    batches = batch_grid(
        arch,
        max_batched_tokens=settings.max_batched_tokens,
        max_context=settings.max_context,
        max_decodes=settings.max_decodes,
        seed=settings.seed,
    )
    with _cpu_threads(settings.threads if device.type == "cpu" else None):
        clock, device_name = _Stopwatch(device).name, describe_device(device)
        model = RandomWeightModel(
            arch, layers, device=device, dtype=DTYPES[settings.dtype], seed=settings.seed
        )
        measurements = measure(
            model,
            batches,
            warmup=settings.warmup,
            repeats=settings.repeats,
            seed=settings.seed,
            progress=progress,
        )
        del model  # free the weights and cache before fitting

    features = feature_matrix([m.batch for m in measurements])
    times = np.array([m.seconds for m in measurements])
    provenance = (
        f"shadow profile: {device_name}, torch {torch.__version__}, {settings.dtype}, "
        f"{layers} of {arch.num_layers} decoder layers built and timed (scaled to {arch.num_layers}), "
        f"{len(measurements)} batch shapes, each the median of {settings.repeats} timed runs after "
        f"{settings.warmup} untimed, {clock}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        + (f"; command: {command}" if command else "")
    )
    profile = fit_profile(
        features,
        times,
        model=arch.name,
        hardware=hardware.name if hardware else device_name,
        tp=1,
        provenance=provenance,
    )
    errors = kind_errors(measurements, profile.cost, prior)
    return ProfileRun(
        profile, tuple(measurements), tuple(errors), prior, hardware.name if hardware else None, settings
    )


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set for the block and restored after (it is process-wide)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_profile_run(run: ProfileRun, path: str | Path) -> None:
    """The cost profile `load_profile` reads, with the settings, validation and measurements behind it
    (extra keys, which `load_profile` ignores): the file is its own evidence and can be refitted. One
    measurement a line keeps the file short and its diffs readable."""
    head = run.profile.to_dict() | {
        "settings": asdict(run.settings),
        "prior": None
        if run.prior is None
        else {"hardware": run.prior_hardware, "coefficients": run.prior.to_dict()},
        "validation": [asdict(row) for row in run.errors],
    }
    lines = ",\n".join("    " + json.dumps(m.to_dict(), separators=(",", ":")) for m in run.measurements)
    text = json.dumps(head, indent=2).removesuffix("\n}") + ',\n  "measurements": [\n' + lines + "\n  ]\n}\n"
    Path(path).write_text(text)


def load_measurements(path: str | Path) -> list[Measurement]:
    """The measurements a profile file written by `save_profile_run` carries."""
    return _measurements(json.loads(Path(path).read_text()), path)


def refit_profile_run(
    path: str | Path,
    *,
    prior: LinearCostModel | None = None,
    prior_hardware: str | None = None,
    note: str = "",
) -> ProfileRun:
    """A profile file written by `save_profile_run` (any format version), refitted to the measurements it
    carries without measuring again: for when the cost model's form or its fit changes. Measurements,
    settings, model, hardware and tensor-parallel degree are kept; the provenance keeps how the measurements
    were made and adds that the coefficients were refitted, when, and `note`. The validation is redone
    against `prior` (the file's own prior was fitted in the old form too); None leaves it out."""
    data = json.loads(Path(path).read_text())
    measurements = _measurements(data, path)
    refitted = (
        f"refitted {datetime.datetime.now(datetime.UTC):%Y-%m-%d} to these measurements, not re-measured"
    )
    profile = fit_profile(
        feature_matrix([m.batch for m in measurements]),
        np.array([m.seconds for m in measurements]),
        model=str(data["model"]),
        hardware=str(data["hardware"]),
        tp=int(data["tp"]),
        provenance=f"{data['provenance']}; {refitted}" + (f": {note}" if note else ""),
    )
    errors = kind_errors(measurements, profile.cost, prior)
    settings = ProfileSettings(**data["settings"])
    return ProfileRun(profile, tuple(measurements), tuple(errors), prior, prior_hardware, settings)


def _measurements(data: dict[str, Any], path: str | Path) -> list[Measurement]:
    if "measurements" not in data:
        raise ValueError(f"{path} carries no measurements (not written by `shadow profile`)")
    return [Measurement.from_dict(m) for m in data["measurements"]]


def _significant(seconds: float) -> float:
    """Six significant digits: a thousand times finer than the run-to-run noise."""
    return float(f"{seconds:.6g}")


# ---- the device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"{_cpu_name()} ({threads} torch thread{'s' if threads > 1 else ''})"


def match_hardware_name(device_name: str) -> str | None:
    """The hardware-table entry a device name denotes, or None. Only SXM parts are in the table: a PCIe or
    NVL card of the same name has other clocks, bandwidth and links, and gets no prior rather than a wrong
    one."""
    name = device_name.upper()
    if any(variant in name for variant in ("PCIE", "NVL")):
        return None
    for marker, entry in (
        ("H200", "H200-SXM"),
        ("H100", "H100-SXM"),
        ("A100", "A100-80GB-SXM"),
        ("L40S", "L40S"),
        ("A10G", "A10G"),
    ):
        if marker in name:
            return None if entry == "A100-80GB-SXM" and "40GB" in name else entry
    return None


def device_hardware_name(device: str) -> str | None:
    """The hardware-table entry of a torch device: `cpu` for any CPU (the table's entry is a rough generic
    one), the matching GPU entry otherwise."""
    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        return "cpu"
    if torch_device.type == "cuda" and torch.cuda.is_available():
        return match_hardware_name(torch.cuda.get_device_name(torch_device))
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
