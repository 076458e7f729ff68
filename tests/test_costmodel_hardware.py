import pytest

from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import HARDWARE, get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks, peak_activation_bytes

LLAMA_2_7B = load_model("llama-2-7b")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("a100", "A100-80GB-SXM"),
        ("A100", "A100-80GB-SXM"),
        ("h100", "H100-SXM"),
        ("H200-sxm", "H200-SXM"),
        ("l40s", "L40S"),
        ("A10G", "A10G"),
        ("cpu", "CPU-2core"),
        (" h100 ", "H100-SXM"),
    ],
)
def test_lookup_by_name_or_alias_ignores_case(alias: str, name: str) -> None:
    assert get_hardware(alias).name == name


def test_unknown_hardware_error_lists_what_is_known() -> None:
    with pytest.raises(ValueError, match=r"unknown hardware 'v100'.*A100-80GB-SXM.*H100-SXM.*aliases"):
        get_hardware("v100")


def test_every_entry_is_sourced_and_uses_dense_figures() -> None:
    for hw in HARDWARE.values():
        assert hw.source, hw.name
        assert hw.peak_flops > 0 and hw.memory_bandwidth > 0 and hw.memory_bytes > 0, hw.name
    # a sparsity figure slipping in would double these
    assert get_hardware("a100").peak_flops == 312e12
    assert get_hardware("h100").peak_flops < 1e15
    assert "ROUGH" in get_hardware("cpu").source


def test_llama_2_7b_on_an_a100_gets_the_block_count_vllm_reports() -> None:
    # vLLM logs about 7,000-7,500 blocks of 16 tokens for Llama-2-7B on one A100-80GB at the default 0.9
    blocks = kv_capacity_blocks(LLAMA_2_7B, get_hardware("a100"))
    assert 7_000 <= blocks <= 7_600
    # by hand: 0.9 * 80 GiB - 12.55 GiB weights - 0.75 GiB activations - 1 GiB reserve, in 8 MiB blocks
    free = 0.9 * 80 * 2**30 - 2 * 6_738_415_616 - 8192 * (3 * 11008 + 4 * 4096) * 2 - 2**30
    assert blocks == int(free // (16 * 524_288))


def test_capacity_grows_with_memory_fraction_and_tensor_parallelism() -> None:
    a100 = get_hardware("a100")
    base = kv_capacity_blocks(LLAMA_2_7B, a100)
    assert kv_capacity_blocks(LLAMA_2_7B, a100, memory_fraction=0.5) < base
    # half the weights and half the KV bytes per token on each GPU: more than twice the blocks
    assert kv_capacity_blocks(LLAMA_2_7B, a100, tp=2) > 2 * base


def test_capacity_counts_tokens_whatever_the_block_size() -> None:
    a100 = get_hardware("a100")
    tokens = kv_capacity_blocks(LLAMA_2_7B, a100, block_size=1)
    assert kv_capacity_blocks(LLAMA_2_7B, a100, block_size=16) == tokens // 16


def test_fp8_kv_cache_doubles_the_blocks() -> None:
    a100 = get_hardware("a100")
    fp16 = kv_capacity_blocks(LLAMA_2_7B, a100, block_size=1)
    assert kv_capacity_blocks(LLAMA_2_7B, a100, block_size=1, kv_dtype_bytes=1) in (2 * fp16, 2 * fp16 + 1)


def test_a_model_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"needs 131\.\d GiB per GPU"):
        kv_capacity_blocks(load_model("llama-2-70b"), get_hardware("a100"))
    assert kv_capacity_blocks(load_model("llama-2-70b"), get_hardware("a100"), tp=2) > 0


def test_activation_reserve_is_the_mlp_and_hidden_state_peak() -> None:
    assert peak_activation_bytes(LLAMA_2_7B, 8192) == 8192 * (3 * 11008 + 4 * 4096) * 2
    assert peak_activation_bytes(load_model("mixtral-8x7b"), 1, tp=2) == (2 * 3 * 14336 // 2 + 4 * 4096) * 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="memory_fraction"):
        kv_capacity_blocks(LLAMA_2_7B, get_hardware("a100"), memory_fraction=1.2)
    with pytest.raises(ValueError, match="block_size"):
        kv_capacity_blocks(LLAMA_2_7B, get_hardware("a100"), block_size=0)
