import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow import costmodel
from vllm_shadow.costmodel.architecture import (
    ModelArchitecture,
    ModelConfigError,
    available_models,
    load_model,
)

LLAMA_2_7B = load_model("llama-2-7b")


def _config(name: str) -> dict:
    return json.loads((Path(costmodel.__file__).parent / "data" / "models" / f"{name}.json").read_text())


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        # published sizes: Llama 2 paper and model cards, Llama 3 model card, Mistral 7B and Mixtral papers,
        # Qwen2 technical report
        ("llama-2-7b", 6.74),
        ("llama-2-70b", 68.98),
        ("llama-3-8b", 8.03),
        ("llama-3-70b", 70.55),
        ("mistral-7b", 7.24),
        ("mixtral-8x7b", 46.70),
        ("qwen2-7b", 7.62),
    ],
)
def test_parameter_counts_match_the_published_sizes(name: str, billions: float) -> None:
    assert load_model(name).num_params / 1e9 == pytest.approx(billions, abs=0.005)


def test_exact_counts_where_they_are_known_to_the_parameter() -> None:
    assert LLAMA_2_7B.num_params == 6_738_415_616
    assert load_model("mistral-7b").num_params == 7_241_732_096


def test_mixtral_weights_count_every_expert_but_a_token_uses_two() -> None:
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.num_active_params / 1e9 == pytest.approx(12.88, abs=0.01)
    assert mixtral.weight_bytes() == 2 * mixtral.num_params
    dense = mixtral.linear_flops(1, 0) / 2  # matmul weights one token passes through
    expert = 3 * 4096 * 14336
    assert dense == mixtral.num_layers * (2 * expert + 4096 * 8 + 2 * 4096 * 4096 + 2 * 4096 * 1024)


def test_dense_models_use_every_parameter_per_token() -> None:
    assert LLAMA_2_7B.num_active_params == LLAMA_2_7B.num_params


def test_qwen2_counts_its_query_key_value_biases() -> None:
    qwen = load_model("qwen2-7b")
    assert qwen.qkv_bias and not qwen.o_bias
    without = ModelArchitecture(**{**_fields(qwen), "qkv_bias": False})
    assert qwen.num_params - without.num_params == 28 * 128 * (28 + 2 * 4)


def test_tied_embeddings_store_the_vocabulary_matrix_once() -> None:
    config = _config("llama-2-7b")
    tied = ModelArchitecture.from_hf_config({**config, "tie_word_embeddings": True})
    assert LLAMA_2_7B.num_params - tied.num_params == 32000 * 4096
    # the LM head is still a matmul the step runs and reads
    assert tied.lm_head_bytes() == LLAMA_2_7B.lm_head_bytes()


def test_head_dim_is_taken_when_given_and_derived_otherwise() -> None:
    assert LLAMA_2_7B.head_dim == 128
    config = _config("llama-3-8b")
    assert ModelArchitecture.from_hf_config({**config, "head_dim": 96}).head_dim == 96


def test_llama_1_config_without_kv_heads_is_multi_head_attention() -> None:
    config = _config("llama-2-7b")
    del config["num_key_value_heads"]
    assert ModelArchitecture.from_hf_config(config).num_kv_heads == 32


def test_dtype_sets_the_bytes_per_weight() -> None:
    config = _config("llama-2-7b")
    assert LLAMA_2_7B.dtype_bytes == 2
    fp32 = ModelArchitecture.from_hf_config({**config, "torch_dtype": "float32"})
    assert fp32.weight_bytes() == 4 * fp32.num_params
    assert (
        ModelArchitecture.from_hf_config({**config, "torch_dtype": None, "dtype": "bfloat16"}).dtype_bytes
        == 2
    )
    with pytest.raises(ValueError, match="unsupported dtype"):
        ModelArchitecture.from_hf_config({**config, "torch_dtype": "float8_e4m3fn"})


def test_unknown_families_are_refused_not_miscounted() -> None:
    config = _config("llama-2-7b")
    with pytest.raises(ValueError, match=r"gemma.*supported: llama, mistral, qwen2, mixtral"):
        ModelArchitecture.from_hf_config({**config, "model_type": "gemma"})


def test_kv_bytes_per_token() -> None:
    assert LLAMA_2_7B.kv_bytes_per_token() == 524_288  # 2 (K, V) * 32 layers * 32 heads * 128 * 2 bytes
    assert LLAMA_2_7B.kv_bytes_per_token(tp=2) == 262_144
    assert LLAMA_2_7B.kv_bytes_per_token(dtype_bytes=1) == 262_144  # FP8 KV cache
    llama70 = load_model("llama-2-70b")
    assert llama70.kv_bytes_per_token() == 327_680
    # 8 KV heads on 16 GPUs: each GPU keeps a replica of one head
    assert llama70.kv_bytes_per_token(tp=16) == 2 * 80 * 1 * 128 * 2


def test_tensor_parallel_shards_all_but_the_norms() -> None:
    replicated = (2 * LLAMA_2_7B.num_layers + 1) * LLAMA_2_7B.hidden_size
    assert 2 * LLAMA_2_7B.params_per_gpu(2) - LLAMA_2_7B.num_params == replicated
    assert LLAMA_2_7B.weight_bytes(tp=2) == 2 * LLAMA_2_7B.params_per_gpu(2)


def test_tensor_parallel_degree_must_divide_the_heads() -> None:
    with pytest.raises(ValueError, match="does not divide 32 heads"):
        LLAMA_2_7B.weight_bytes(tp=3)
    with pytest.raises(ValueError, match="KV heads"):
        load_model("qwen2-7b").kv_bytes_per_token(tp=7)  # 28 heads split 7 ways, but 4 KV heads do not


def test_linear_flops_are_two_per_matmul_weight_with_the_lm_head_once_per_sequence() -> None:
    vocab = 32000 * 4096
    norms = (2 * 32 + 1) * 4096
    body = LLAMA_2_7B.num_params - 2 * vocab - norms
    assert LLAMA_2_7B.linear_flops(1, 1) == 2 * (body + vocab)
    assert LLAMA_2_7B.linear_flops(4096, 1) == 2 * (4096 * body + vocab)
    assert LLAMA_2_7B.linear_flops(4096, 1, tp=2) == pytest.approx(LLAMA_2_7B.linear_flops(4096, 1) / 2)


def test_attention_flops_worked_by_hand() -> None:
    per_pair = 4 * 32 * 32 * 128  # QK^T and AV, 2 FLOPs per multiply-add, every head of every layer
    assert LLAMA_2_7B.attention_flops(1, 0) == per_pair
    assert LLAMA_2_7B.attention_flops(4, 0) == per_pair * (1 + 2 + 3 + 4)
    assert LLAMA_2_7B.attention_flops(1, 99) == per_pair * 100
    assert LLAMA_2_7B.attention_flops(4096, 0, tp=4) == pytest.approx(per_pair * 4096 * 4097 / 2 / 4)


def test_sliding_window_caps_what_each_query_attends() -> None:
    mistral = load_model("mistral-7b")
    assert mistral.sliding_window == 4096
    assert mistral.attended_pairs(1, 10_000) == 4096
    assert mistral.attended_keys(1, 10_000) == 4096
    assert mistral.attended_keys(100, 10_000) == 4096 + 99
    assert load_model("qwen2-7b").sliding_window is None  # use_sliding_window is false


@given(new=st.integers(0, 300), ctx=st.integers(0, 300), window=st.one_of(st.none(), st.integers(1, 400)))
def test_attended_pairs_closed_form_equals_the_sum_over_queries(
    new: int, ctx: int, window: int | None
) -> None:
    arch = ModelArchitecture(**{**_fields(LLAMA_2_7B), "sliding_window": window})
    expected = sum(min(p, window) if window else p for p in range(ctx + 1, ctx + new + 1))
    assert arch.attended_pairs(new, ctx) == expected


def test_experts_touched_grow_from_top_k_to_all() -> None:
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.expected_experts_touched(1) == pytest.approx(2.0)
    assert mixtral.expected_experts_touched(4) == pytest.approx(8 * (1 - 0.75**4))
    assert mixtral.expected_experts_touched(512) == pytest.approx(8.0)
    assert LLAMA_2_7B.expected_experts_touched(512) == 1.0
    assert mixtral.matmul_weight_bytes(1) < mixtral.matmul_weight_bytes(512)


def test_tiny_llama_is_the_engine_test_model() -> None:
    tiny = load_model("tiny-llama")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads) == (4, 256, 4, 2)
    assert (tiny.head_dim, tiny.intermediate_size, tiny.vocab_size, tiny.dtype_bytes) == (64, 688, 32000, 2)
    assert tiny.max_position_embeddings == 4096


def test_tiny_llama_matches_the_config_the_vllm_engine_is_started_with() -> None:
    engine_config = Path(__file__).parents[1] / "adapters" / "data" / "tiny-llama"
    assert load_model(engine_config) == load_model("tiny-llama")


def test_load_model_by_name_by_file_and_by_directory(tmp_path: Path) -> None:
    assert set(available_models()) >= {"llama-2-7b", "mixtral-8x7b", "tiny-llama"}
    config = json.dumps(_config("qwen2-7b"))
    (tmp_path / "my-qwen").mkdir()
    (tmp_path / "my-qwen" / "config.json").write_text(config)
    by_dir = load_model(tmp_path / "my-qwen")
    by_file = load_model(str(tmp_path / "my-qwen" / "config.json"))
    assert by_dir == by_file
    assert by_dir.name == "my-qwen"
    assert by_dir.num_params == load_model("qwen2-7b").num_params
    with pytest.raises(FileNotFoundError, match="llama-2-7b"):
        load_model("no-such-model")


def test_inconsistent_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="KV groups"):
        ModelArchitecture(**{**_fields(LLAMA_2_7B), "num_kv_heads": 5})
    with pytest.raises(ValueError, match="experts per token"):
        ModelArchitecture(**{**_fields(LLAMA_2_7B), "experts_per_token": 2})


def _fields(arch: ModelArchitecture) -> dict:
    return {name: getattr(arch, name) for name in ModelArchitecture.__dataclass_fields__}


# --- foreign and damaged configs (issue 13, item 9) ---------------------------------------------------------


def _write_config(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "config.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("content", "field", "fragment"),
    [
        ("[1, 2]", None, "expected a JSON object"),
        ('{"model_type": "llama",', None, "not JSON"),
        (b"\xff\xfe{}", None, "not UTF-8"),
    ],
)
def test_a_config_file_that_is_no_json_object_is_refused_naming_it(
    tmp_path: Path, content: str, field: str | None, fragment: str
) -> None:
    path = _write_config(tmp_path, content)
    with pytest.raises(ModelConfigError, match="^" + re.escape(str(path))) as caught:
        load_model(path)
    assert caught.value.field == field and fragment in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("num_attention_heads", "32", "expected a positive integer"),
        ("num_attention_heads", 0, "expected a positive integer"),
        ("hidden_size", 4096.0, "expected a positive integer"),
        ("num_hidden_layers", True, "expected a positive integer"),
        ("num_hidden_layers", None, "missing"),
        ("vocab_size", -1, "expected a positive integer"),
        ("num_key_value_heads", "8", "expected a positive integer"),
        ("head_dim", [128], "expected a positive integer"),
        ("torch_dtype", ["bfloat16"], "unsupported dtype"),
        ("tie_word_embeddings", "false", "expected true or false"),
        ("sliding_window", "4096", "expected a positive integer"),
        ("num_key_value_heads", 5, "KV groups"),
    ],
)
def test_a_bad_field_is_refused_naming_the_file_and_the_field(
    tmp_path: Path, field: str, value: object, fragment: str
) -> None:
    config = {**_config("mistral-7b"), field: value}
    if value is None:
        del config[field]
    path = _write_config(tmp_path, json.dumps(config))
    with pytest.raises(ModelConfigError, match="^" + re.escape(str(path))) as caught:
        load_model(path)
    assert caught.value.field == (None if fragment == "KV groups" else field)
    assert fragment in str(caught.value)


def _config_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=8)
    return scalars | st.lists(scalars, max_size=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_config_loads_or_is_refused_with_a_model_config_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    base = _config(data.draw(st.sampled_from(["mistral-7b", "qwen2-7b", "mixtral-8x7b", "llama-2-7b"])))
    changes = data.draw(
        st.dictionaries(st.sampled_from([*sorted(base), "head_dim"]), _config_values(), max_size=3)
    )
    config = {**base, **changes}
    text = json.dumps(config)
    if data.draw(st.booleans()):  # or a truncation of it, or any bytes
        text = text[: data.draw(st.integers(0, len(text)))]
    path = _write_config(tmp_path, text)
    try:
        arch = load_model(path)
    except ModelConfigError as error:
        assert str(error).startswith(str(path))
    else:
        assert arch.num_params > 0 and arch.kv_bytes_per_token() > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_with_a_model_config_error(tmp_path: Path, content: bytes) -> None:
    path = _write_config(tmp_path, content)
    with pytest.raises(ModelConfigError, match="^" + re.escape(str(path))):
        load_model(path)


@pytest.mark.parametrize("name", ["llama-2-7b", "mistral-7b", "qwen2-7b", "mixtral-8x7b", "tiny-llama"])
def test_a_bundled_config_round_trips_through_a_file(tmp_path: Path, name: str) -> None:
    path = _write_config(tmp_path, json.dumps(_config(name)))
    assert load_model(path) == dataclasses.replace(load_model(name), name=tmp_path.name)
