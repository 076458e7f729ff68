"""A random-weight decoder built from a Hugging Face config, in plain torch, and its step inputs.

What one timed step computes, and why:
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
Mixture-of-experts models are refused: an eager loop over experts would time Python, not a fused MoE kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vllm_shadow.costmodel.architecture import ModelArchitecture
from vllm_shadow.costmodel.profiling.grid import BatchShape

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A padded decode group attends at most this fraction more keys than its requests' contexts, or this many.
DECODE_PADDING, DECODE_PADDING_KEYS = 0.25, 1024
_RMS_EPS = 1e-5
_ROPE_THETA = 10000.0  # not in ModelArchitecture, and it changes values, not time
_WEIGHT_STD = 0.02


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
