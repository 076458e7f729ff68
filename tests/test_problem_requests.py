"""`WindowRequest`'s hand-written __init__ (the live shadow makes hundreds a window) keeps what the generated one
and its __post_init__ gave: the same checks in the same order with the same messages, and a frozen, hashable,
picklable dataclass that `dataclasses.replace` rebuilds through the same checks."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_shadow.solver.problem import WindowRequest


def reference_error(prompt: int, output: int, computed: int, generated: int) -> str | None:
    """The checks of the generated __init__'s __post_init__ (commit 98385f8), on request "r"."""
    if prompt < 1 or output < 1:
        return "request r: prompt and output must be >= 1 token"
    if not 0 <= generated < output:
        return "request r: generated tokens must be in [0, output)"
    if not 0 <= computed < prompt + generated:
        return f"request r: computed tokens {computed} out of range"
    return None


small = st.integers(-2, 6)


@given(small, small, small, small)
def test_checks_as_before(prompt: int, output: int, computed: int, generated: int) -> None:
    expected = reference_error(prompt, output, computed, generated)
    if expected is None:
        request = WindowRequest("r", 0.5, prompt, output, computed, generated)
        assert (request.prompt_tokens, request.output_tokens) == (prompt, output)
        assert (request.computed_tokens, request.generated_tokens) == (computed, generated)
        assert request.target_tokens == prompt + generated
    else:
        with pytest.raises(ValueError) as raised:
            WindowRequest("r", 0.5, prompt, output, computed, generated)
        assert str(raised.value) == expected


def test_a_frozen_dataclass() -> None:
    request = WindowRequest("a", 1.25, 7, 3, computed_tokens=8, generated_tokens=2)
    assert request == WindowRequest("a", 1.25, 7, 3, 8, 2)
    assert request != WindowRequest("a", 1.5, 7, 3, 8, 2)
    assert hash(request) == hash(WindowRequest("a", 1.25, 7, 3, 8, 2))
    assert repr(request) == (
        "WindowRequest(request_id='a', arrival=1.25, prompt_tokens=7, output_tokens=3, computed_tokens=8, "
        "generated_tokens=2)"
    )
    assert [f.name for f in dataclasses.fields(WindowRequest)] == list(WindowRequest.__slots__)
    assert WindowRequest("b", 0.0, 2, 1) == WindowRequest("b", 0.0, 2, 1, 0, 0)  # the defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.arrival = 2.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(request)) == request
    assert copy.deepcopy(request) == request
    assert dataclasses.replace(request, generated_tokens=0, computed_tokens=0) == WindowRequest(
        "a", 1.25, 7, 3
    )
    with pytest.raises(ValueError, match="computed tokens 9 out of range"):
        dataclasses.replace(request, computed_tokens=9)
