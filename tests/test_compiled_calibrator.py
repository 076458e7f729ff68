"""The compiled online calibrator (costmodel/linear.py built by Cython, see setup.py) against the plain-Python one.

Both run the same source. The property test drives both with the same random step streams and holds them to the
same state after every step, bit for bit: the coefficients, the running error and the sample count, or the same
exception. Its streams pull coefficients below zero often, so the constrained refits (the hinted solve and the
iterations) are held to it as well as the unconstrained one.

The compiled calibrator must be built (`pip install -e .` builds it). Only where the build was skipped on purpose
(VLLM_SHADOW_SKIP_COMPILE=1, a machine without a C compiler) do these tests skip instead of failing.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.compiled_support import current_build
from vllm_shadow.costmodel import linear
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver import compiled_build

PRIORS = [
    LinearCostModel(a=9e-3, b=3.5e-5, c=3.5e-7, d=1e-8),
    LinearCostModel(a=3e-3, b=1.9e-5, c=2.9e-7, d=1.5e-8, e=1.6e-4),
    LinearCostModel(5e-3, 2e-5, 2e-7),
]
# Step times whose square Python's float power (C's pow) and a multiplication round differently: a build that
# squared them with `y * y` would weigh these steps one bit differently.
POW_IS_NOT_A_PRODUCT = [
    float.fromhex("0x1.096e4a972b7b5p+0"),
    float.fromhex("0x1.c70de4240ee4fp-1"),
    float.fromhex("0x1.6d3e124f84d8p-13"),
    float.fromhex("0x1.04dcc3809fb9ap-6"),
    float.fromhex("0x1.b8603b3fa41a1p-10"),
]


def calibrators() -> tuple[type, type]:
    """(compiled, pure) calibrator classes; skips only where the build was skipped on purpose, fails anywhere
    else."""
    compiled = current_build(
        linear.compiled_calibrator(), linear.COMPILED_MODULE, "online calibrator", compiled_build_stale
    )
    pure = linear.pure_calibrator()
    assert pure.OnlineCalibrator is not compiled.OnlineCalibrator
    # Its state is C doubles in the build: no instance dictionary, no Python attribute.
    assert not hasattr(compiled.OnlineCalibrator(PRIORS[0]), "_coefficients")
    return compiled.OnlineCalibrator, pure.OnlineCalibrator


def compiled_build_stale(compiled: ModuleType) -> list[str]:
    return compiled_build.stale_sources(compiled, linear._SOURCE, linear._DECLARATIONS)


def state(calibrator: object) -> tuple:
    """Everything a calibrator tells, floats by their bits."""
    model = calibrator.model()  # type: ignore[attr-defined]
    coefficients = [getattr(model, name) for name in linear.COEFFICIENTS]
    return (*(value.hex() for value in coefficients), calibrator.mape().hex(), calibrator.samples)  # type: ignore[attr-defined]


def outcome(calibrator: object, step: tuple) -> tuple:
    try:
        calibrator.update_features(*step)  # type: ignore[attr-defined]
    except Exception as error:  # the same refusal, at the same step
        return (type(error).__name__, str(error))
    return state(calibrator)


@st.composite
def steps(draw: st.DrawFn) -> tuple:
    """(T, K, P, R, seconds) of a step, mostly valid."""
    requests = draw(st.integers(1, 256))
    tokens = requests + draw(st.sampled_from([0, 0, draw(st.integers(0, 8192))]))
    kv_tokens = tokens + draw(st.integers(0, 2_000_000))
    attention = 0 if tokens == requests else draw(st.integers(0, 10**10))
    seconds = draw(
        st.one_of(
            st.floats(1e-4, 2.0),
            st.sampled_from(POW_IS_NOT_A_PRODUCT),
            st.sampled_from([0.0, -1e-3, math.inf, math.nan]),  # refused
        )
    )
    if draw(st.integers(0, 50)) == 0:
        tokens = 0  # refused
    return tokens, kv_tokens, attention, requests, seconds


@settings(max_examples=150, deadline=None)
@given(
    prior=st.sampled_from(PRIORS),
    forgetting=st.sampled_from([1.0, 0.999, 0.9]),
    stream=st.lists(steps(), max_size=80),
)
def test_the_compiled_calibrator_follows_the_plain_one_bit_for_bit(
    prior: LinearCostModel, forgetting: float, stream: list[tuple]
) -> None:
    compiled_class, pure_class = calibrators()
    compiled, pure = compiled_class(prior, forgetting=forgetting), pure_class(prior, forgetting=forgetting)
    assert state(compiled) == state(pure)
    for step in stream:
        assert outcome(compiled, step) == outcome(pure, step)


def test_the_constrained_refits_are_held_to_it_too() -> None:
    """Times drawn independently of the steps' features pull coefficients below zero: the refits that solve on
    the last one's positive coefficients, and the iterations where those are not this one's, are compared."""
    compiled_class, pure_class = calibrators()
    compiled, pure = compiled_class(PRIORS[1]), pure_class(PRIORS[1])
    constrained = 0
    for n in range(3000):
        requests = 1 + n * 7919 % 200
        tokens = requests + (0 if n % 3 else n * 104729 % 4000)
        step = (tokens, tokens + n * 15485863 % 10**6, 0 if n % 3 else tokens * 1000, requests)
        seconds = POW_IS_NOT_A_PRODUCT[n % 5] * (1e-2 + n * 2654435761 % 1000 / 1e4)
        assert outcome(compiled, (*step, seconds)) == outcome(pure, (*step, seconds))
        constrained += bool(pure._positive_coefficients)
    assert constrained > 1000


def test_the_models_of_the_calibrator_in_use_are_the_modules_own() -> None:
    model = linear.OnlineCalibrator(PRIORS[0]).model()
    assert type(model) is LinearCostModel and model == PRIORS[0]


def test_the_calibrator_in_use_is_the_compiled_one_unless_plain_python_is_asked_for() -> None:
    compiled_class, pure_class = calibrators()
    if os.environ.get("VLLM_SHADOW_PURE_PYTHON", "") not in ("", "0"):
        assert linear.OnlineCalibrator is pure_class and not linear.COMPILED
    else:
        assert linear.OnlineCalibrator is compiled_class and linear.COMPILED
