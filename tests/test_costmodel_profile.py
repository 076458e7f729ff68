import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_shadow.costmodel.linear import LinearCostModel, batch_features
from vllm_shadow.costmodel.profile import CostProfile, ProfileError, fit_profile, load_profile, save_profile

PROFILE = CostProfile(
    model="llama-2-7b",
    hardware="A100-80GB-SXM",
    tp=1,
    cost=LinearCostModel(a=9e-3, b=3.5e-5, c=3.5e-7, d=1e-8, e=2e-5),
    holdout_mape=0.071,
    samples=1234,
    provenance="vLLM 0.32 on 1xA100, azure-conv trace",
)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    save_profile(PROFILE, path)
    assert load_profile(path) == PROFILE
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == ("shadow-cost-profile", 2)
    assert data["coefficients"] == {"a": 9e-3, "b": 3.5e-5, "c": 3.5e-7, "d": 1e-8, "e": 2e-5}


def test_version_1_files_load_without_the_per_request_term(tmp_path: Path) -> None:
    """A file written before the model had e: its coefficients are the 4-term model it was fitted with."""
    path = tmp_path / "v1.json"
    old = {
        **PROFILE.to_dict(),
        "version": 1,
        "coefficients": {"a": 9e-3, "b": 3.5e-5, "c": 3.5e-7, "d": 1e-8},
    }
    path.write_text(json.dumps(old))
    assert load_profile(path).cost == LinearCostModel(a=9e-3, b=3.5e-5, c=3.5e-7, d=1e-8, e=0.0)
    path.write_text(json.dumps({**old, "coefficients": PROFILE.cost.to_dict()}))
    with pytest.raises(ValueError, match="version 1 file has no per-request coefficient"):
        load_profile(path)


def test_unmeasured_holdout_error_round_trips_as_null(tmp_path: Path) -> None:
    path = tmp_path / "prior.json"
    prior = CostProfile("tiny-llama", "CPU-2core", 1, LinearCostModel(1e-3, 1e-5, 1e-7), None, 0, "roofline")
    save_profile(prior, path)
    assert json.loads(path.read_text())["holdout_mape"] is None
    assert load_profile(path) == prior


def test_other_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({**PROFILE.to_dict(), "version": 99}))
    with pytest.raises(ValueError, match="shadow-cost-profile version 1 or 2"):
        load_profile(path)
    path.write_text(json.dumps({"a": 1.0}))
    with pytest.raises(ValueError, match="not a shadow-cost-profile"):
        load_profile(path)


def test_fit_profile_records_the_fit_and_its_holdout_error() -> None:
    truth = PROFILE.cost
    rng = np.random.default_rng(0)
    batches = [([1] * int(n), [int(c)] * int(n)) for n, c in rng.integers(1, 128, size=(40, 2))]
    batches += [([int(n)], [0]) for n in rng.integers(64, 4096, size=20)]
    batches += [([int(n)] * 8, [0] * 8) for n in rng.integers(8, 512, size=10)]  # prompts batched together
    features = np.array([batch_features(new, ctx) for new, ctx in batches], dtype=float)
    times = truth.predict(features) * (1 + 0.02 * rng.standard_normal(len(batches)))
    profile = fit_profile(
        features, times, model="llama-2-7b", hardware="A100-80GB-SXM", tp=1, provenance="test"
    )
    assert profile.samples == 70
    assert 0.005 < profile.holdout_mape < 0.04
    assert profile.cost.a == pytest.approx(truth.a, rel=0.1)
    assert profile.cost.e == pytest.approx(truth.e, rel=0.3)


# --- foreign and damaged files (issue 13, item 9) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "field", "fragment"),
    [
        ('{"format": "shadow-cost-profile",', None, "not JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        ("", None, "not JSON"),
        (b"\xff\x00", None, "not UTF-8"),
        (json.dumps({**PROFILE.to_dict(), "tp": "1"}), "tp", "positive integer"),
        (json.dumps({**PROFILE.to_dict(), "tp": 0}), "tp", "positive integer"),
        (json.dumps({**PROFILE.to_dict(), "samples": 1.5}), "samples", "non-negative integer"),
        (json.dumps({**PROFILE.to_dict(), "holdout_mape": "7%"}), "holdout_mape", "number"),
        (json.dumps({**PROFILE.to_dict(), "coefficients": [1, 2, 3]}), "coefficients", "JSON object"),
        (json.dumps({**PROFILE.to_dict(), "coefficients": {"a": "x", "b": 1, "c": 1}}), "coefficients", "a"),
        (
            '{"format": "shadow-cost-profile", "version": 2, "coefficients": {"a": NaN, "b": 0, "c": 0}}',
            "coefficients",
            "finite",
        ),
        (json.dumps({k: v for k, v in PROFILE.to_dict().items() if k != "model"}), "model", "missing"),
    ],
)
def test_a_bad_profile_file_is_refused_naming_it_and_the_field(
    tmp_path: Path, content: str | bytes, field: str | None, fragment: str
) -> None:
    path = tmp_path / "profile.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ProfileError, match="^" + re.escape(str(path))) as caught:
        load_profile(path)
    assert caught.value.field == field and fragment in str(caught.value)


def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="^" + re.escape(str(tmp_path))):
        load_profile(tmp_path)


_VALUES = st.none() | st.booleans() | st.integers(-3, 2**1100) | st.floats() | st.text(max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_profile_loads_or_is_refused_with_a_profile_error(tmp_path: Path, data: st.DataObject) -> None:
    profile = PROFILE.to_dict()
    keys = st.sampled_from(sorted(profile))
    profile |= data.draw(st.dictionaries(keys, _VALUES | st.lists(_VALUES, max_size=2), max_size=2))
    coefficients = dict(PROFILE.cost.to_dict())
    coefficients |= data.draw(st.dictionaries(st.sampled_from("abcdez"), _VALUES, max_size=2))
    if isinstance(profile["coefficients"], dict):
        profile["coefficients"] = coefficients
    text = json.dumps(profile)
    if data.draw(st.booleans()):
        text = text[: data.draw(st.integers(0, len(text)))]
    path = tmp_path / "p.json"
    path.write_text(text)
    try:
        loaded = load_profile(path)
    except ProfileError as error:
        assert str(error).startswith(str(path))
    else:
        save_profile(loaded, path)
        assert load_profile(path) == loaded


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_with_a_profile_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match="^" + re.escape(str(path))):
        load_profile(path)
