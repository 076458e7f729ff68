"""A decoder-only transformer's shape, read from its Hugging Face `config.json`, and what follows from it:
parameter counts, weight and KV-cache bytes per GPU under tensor parallelism, and FLOPs per step.

Supported families: Llama 1/2/3, Mistral, Qwen2 and Mixtral-style mixture of experts. All four use pre-RMSNorm
blocks (one weight vector per norm), rotary position embeddings (no parameters), grouped-query attention and a
gated SiLU MLP of three matrices (gate, up, down). Other families are refused rather than miscounted.

Tensor parallelism follows vLLM's Megatron-style sharding: attention by heads (KV heads replicated when there
are fewer than GPUs), MLP and each expert by intermediate columns, embedding and LM head by vocabulary rows;
norms, the MoE router and row-parallel biases are replicated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vllm_shadow.costmodel.file_errors import FieldError, json_text

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_BUNDLED = resources.files("vllm_shadow.costmodel") / "data" / "models"


class ModelConfigError(FieldError):
    """A model config that describes no supported model; the message names the file (if any) and the field."""


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    """`config[key]`, a positive integer; `default` when absent or null (a required field has none)."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ModelConfigError(None, key, "missing")
        return default
    # `type(...) is int` because bool is an int subclass, and `true` is no layer count.
    if type(value) is not int or value <= 0:
        raise ModelConfigError(None, key, f"expected a positive integer, got {json_text(value)}")
    return value


def _flag(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if type(value) is not bool:  # "false" is truthy: a string here would silently turn the feature on
        raise ModelConfigError(None, key, f"expected true or false, got {json_text(value)}")
    return value


@dataclass(frozen=True, slots=True)
class ModelArchitecture:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # per expert for MoE models
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    num_experts: int = 1  # 1 for a dense MLP
    experts_per_token: int = 1
    sliding_window: int | None = None  # each query attends to at most this many most recent positions
    # The checkpoint's dtype. vLLM serves float32 checkpoints in 16 bits unless told otherwise; pass
    # `dtype_bytes` to the byte counts below to model another serving dtype.
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for field_name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "num_experts",
            "experts_per_token",
            "dtype_bytes",
        ):
            if getattr(self, field_name) <= 0:
                raise ValueError(
                    f"{self.name}: {field_name} must be positive, got {getattr(self, field_name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: {self.num_heads} heads do not split into {self.num_kv_heads} KV groups"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"{self.name}: {self.experts_per_token} experts per token of {self.num_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"{self.name}: sliding_window must be positive or None, got {self.sliding_window}"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None) -> ModelArchitecture:
        """Raises `ModelConfigError` (a ValueError naming the field) on a config this module cannot model."""
        if not isinstance(config, dict):
            raise ModelConfigError(None, None, f"expected a JSON object, got {json_text(config)}")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                None,
                "model_type",
                f"model_type {json_text(model_type)} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            )
        hidden = _positive_int(config, "hidden_size")
        heads = _positive_int(config, "num_attention_heads")
        # Newer transformers write "dtype"; configs old enough to have neither were float16 checkpoints.
        dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise ModelConfigError(
                None,
                "torch_dtype",
                f"unsupported dtype {json_text(dtype)}; supported: {', '.join(_DTYPE_BYTES)}",
            )
        # Llama's attention_bias puts biases on q, k, v and o; Qwen2 always has q, k, v biases and none on o.
        attention_bias = _flag(config, "attention_bias", False)
        qwen2 = model_type == "qwen2"
        # Qwen2 configs carry a sliding_window value that only applies when use_sliding_window is set.
        use_window = _flag(config, "use_sliding_window", not qwen2)
        window = _positive_int(config, "sliding_window", 0) or None if use_window else None
        if config.get("max_position_embeddings") is not None:
            max_positions = _positive_int(config, "max_position_embeddings")
        elif config.get("max_sequence_length") is not None:
            max_positions = _positive_int(config, "max_sequence_length")
        else:
            raise ModelConfigError(
                None, None, "config has neither max_position_embeddings nor max_sequence_length"
            )
        label = name or config.get("_name_or_path") or model_type
        try:
            return cls(
                name=str(label),
                model_type=model_type,
                num_layers=_positive_int(config, "num_hidden_layers"),
                hidden_size=hidden,
                num_heads=heads,
                # Llama 1 configs predate GQA and omit the key: one KV head per query head.
                num_kv_heads=_positive_int(config, "num_key_value_heads", heads),
                head_dim=_positive_int(config, "head_dim", hidden // heads),
                intermediate_size=_positive_int(config, "intermediate_size"),
                vocab_size=_positive_int(config, "vocab_size"),
                max_position_embeddings=max_positions,
                tie_word_embeddings=_flag(config, "tie_word_embeddings", False),
                qkv_bias=attention_bias or qwen2,
                o_bias=attention_bias,
                num_experts=_positive_int(config, "num_local_experts", 1),
                experts_per_token=_positive_int(config, "num_experts_per_tok", 1),
                sliding_window=window,
                dtype_bytes=_DTYPE_BYTES[dtype],
            )
        except ModelConfigError:
            raise
        except ValueError as error:  # shapes that do not fit together, e.g. heads and KV heads
            raise ModelConfigError(None, None, str(error)) from None

    # ---- parameters and bytes

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        self._check_tp(tp)
        return max(1, self.num_kv_heads // tp)

    def params_per_gpu(self, tp: int = 1) -> int:
        """Parameters one GPU stores at tensor-parallel degree `tp` (the whole model at tp=1)."""
        return self._params(tp, self.num_experts)

    @property
    def num_params(self) -> int:
        return self._params(1, self.num_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters one token passes through: only its routed experts, with the embedding and LM head."""
        return self._params(1, self.experts_per_token)

    def weight_bytes(self, tp: int = 1, dtype_bytes: int | None = None) -> int:
        """Bytes of weights on each GPU; `dtype_bytes` overrides the checkpoint's dtype (e.g. 1 for FP8)."""
        return self.params_per_gpu(tp) * (dtype_bytes or self.dtype_bytes)

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int | None = None) -> int:
        """KV-cache bytes one token occupies on each GPU: a K and a V vector per KV head per layer."""
        vector_bytes = self.head_dim * (dtype_bytes or self.dtype_bytes)
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * vector_bytes

    def expected_experts_touched(self, num_tokens: int) -> float:
        """Experts per layer whose weights a step over `num_tokens` tokens must read, if routing is uniform:
        E * (1 - (1 - k/E)^n). One decode token reads k experts; a large batch reads them all."""
        if self.num_experts == 1:
            return 1.0
        miss = 1.0 - self.experts_per_token / self.num_experts
        return self.num_experts * (1.0 - miss**num_tokens)

    def matmul_weight_bytes(self, num_tokens: int, tp: int = 1, dtype_bytes: int | None = None) -> float:
        """Bytes of layer matmul weights one GPU reads in a forward pass over `num_tokens` tokens: attention
        projections and router of every layer, and the experts the tokens touch. The LM head is separate
        (`lm_head_bytes`); the embedding table is only gathered, a row per token, so it costs no weight
        read."""
        per_layer = (
            self._attention_params(tp)
            + self._router_params()
            + self.expected_experts_touched(num_tokens) * self._expert_params(tp)
        )
        return self.num_layers * per_layer * (dtype_bytes or self.dtype_bytes)

    def lm_head_bytes(self, tp: int = 1, dtype_bytes: int | None = None) -> int:
        """Bytes of the vocabulary projection on one GPU, read whole by every step (tied or not)."""
        return self._lm_head_matmul_params(tp) * (dtype_bytes or self.dtype_bytes)

    # ---- FLOPs

    def linear_flops(self, num_tokens: int, num_logits: int, tp: int = 1) -> float:
        """Matmul FLOPs on one GPU: 2 per weight per token through the layers, plus the LM head for
        `num_logits` positions only (vLLM projects just each scheduled request's last position to the
        vocabulary)."""
        per_token = self.num_layers * (
            self._attention_params(tp)
            + self._router_params()
            + self.experts_per_token * self._expert_params(tp)
        )
        return 2.0 * (num_tokens * per_token + num_logits * self._lm_head_matmul_params(tp))

    def attended_pairs(self, new: int, ctx: int) -> int:
        """Query-key pairs of causal attention for `new` tokens appended to `ctx` cached ones: the query at
        position p (1-based) sees min(p, window) keys, so sum_{p=ctx+1}^{ctx+new} min(p, window); without a
        window that is new * (ctx + (new + 1) / 2)."""
        end = ctx + new
        split = end if self.sliding_window is None else min(max(self.sliding_window, ctx), end)
        below_window = (split * (split + 1) - ctx * (ctx + 1)) // 2
        return below_window + (end - split) * (self.sliding_window or 0)

    def attended_keys(self, new: int, ctx: int) -> int:
        """Positions whose K and V one request's step reads: all ctx + new of them, or with a sliding window
        those within reach of at least one of its queries."""
        end = ctx + new
        return end if self.sliding_window is None else min(end, self.sliding_window + new - 1)

    def attention_flops(self, new: int, ctx: int, tp: int = 1) -> float:
        """FLOPs of causal QK^T and AV on one GPU for `new` tokens appended to `ctx` cached ones."""
        return self.attention_flops_per_pair(tp) * self.attended_pairs(new, ctx)

    def attention_flops_per_pair(self, tp: int = 1) -> float:
        """FLOPs one query-key pair costs on one GPU: 2 * head_dim for QK^T and as many for AV, per query head
        per layer."""
        self._check_tp(tp)
        return 4.0 * self.num_layers * (self.num_heads // tp) * self.head_dim

    # ---- internals

    def _check_tp(self, tp: int) -> None:
        if tp <= 0 or self.num_heads % tp:
            raise ValueError(
                f"{self.name}: tensor-parallel degree {tp} does not divide {self.num_heads} heads"
            )
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: tensor-parallel degree {tp} and {self.num_kv_heads} KV heads do not "
                "divide one another"
            )

    def _attention_params(self, tp: int) -> int:
        q_heads = self.num_heads // tp
        kv_heads = self.kv_heads_per_gpu(tp)
        projections = self.hidden_size * self.head_dim * (2 * q_heads + 2 * kv_heads)  # q, o; k, v
        qkv_biases = self.head_dim * (q_heads + 2 * kv_heads) if self.qkv_bias else 0
        o_bias = self.hidden_size if self.o_bias else 0  # row-parallel: every GPU holds all of it
        return projections + qkv_biases + o_bias

    def _expert_params(self, tp: int) -> int:
        return 3 * self.hidden_size * (self.intermediate_size // tp)

    def _router_params(self) -> int:
        return self.hidden_size * self.num_experts if self.num_experts > 1 else 0

    def _lm_head_matmul_params(self, tp: int) -> int:
        return self.vocab_size * self.hidden_size // tp

    def _params(self, tp: int, experts: int) -> int:
        self._check_tp(tp)
        layer = (
            self._attention_params(tp)
            + self._router_params()
            + experts * self._expert_params(tp)
            + 2 * self.hidden_size  # input and post-attention RMSNorm weights
        )
        embeddings = self.vocab_size * self.hidden_size // tp
        lm_head = 0 if self.tie_word_embeddings else embeddings
        return self.num_layers * layer + embeddings + lm_head + self.hidden_size  # + final norm


def available_models() -> list[str]:
    """Names of the bundled configs (`costmodel/data/models/<name>.json`)."""
    return sorted(
        entry.name.removesuffix(".json") for entry in _BUNDLED.iterdir() if entry.name.endswith(".json")
    )


def load_model(name_or_path: str | Path) -> ModelArchitecture:
    """A bundled model by name, or a `config.json` given by its path or by the directory holding it."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _load_config(path, path.parent.name if path.name == "config.json" else path.stem)
    bundled = _BUNDLED / f"{name_or_path}.json"
    if bundled.is_file():
        return ModelArchitecture.from_hf_config(json.loads(bundled.read_text()), name=str(name_or_path))
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a config.json, a directory holding one, nor a bundled model "
        f"({', '.join(available_models())})"
    )


def _load_config(path: Path, name: str) -> ModelArchitecture:
    """The model a `config.json` describes; `ModelConfigError` naming the file (and field) otherwise."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ModelConfigError(path, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:  # JSONDecodeError, and integers too long to convert
        raise ModelConfigError(path, None, f"not JSON: {error}") from None
    try:
        return ModelArchitecture.from_hf_config(config, name=name)
    except ModelConfigError as error:
        raise ModelConfigError(path, error.field, error.problem) from None
