"""Synthetic workloads: seeded arrival processes and length distributions, returned as a `Trace`.

    generate(1000, arrival=Gamma(rate=5, cv=3), prompt=LogNormal(median=1020, mean=1155), output=Fixed(128))

Arrivals, prompt lengths and output lengths each draw from their own random stream derived from the seed, so
changing one of them (say the arrival rate) leaves the others exactly as they were: two workloads that differ
in one knob differ only in that knob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import Trace

# Lengths are clipped below this so that rounding a far log-normal tail can never overflow int64.
_MAX_TOKENS = 2**62


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --- arrival processes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Poisson:
    """Independent arrivals at `rate` requests per second (exponential gaps)."""

    rate: float

    def __post_init__(self) -> None:
        _check(math.isfinite(self.rate) and self.rate > 0, f"rate must be > 0, got {self.rate}")

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate, n)


@dataclass(frozen=True, slots=True)
class Gamma:
    """Gamma-distributed gaps with mean 1/`rate` and coefficient of variation `cv`.

    cv = 1 is Poisson; cv > 1 is bursty (clusters of arrivals between long lulls); cv < 1 is more regular.
    """

    rate: float
    cv: float

    def __post_init__(self) -> None:
        _check(math.isfinite(self.rate) and self.rate > 0, f"rate must be > 0, got {self.rate}")
        _check(math.isfinite(self.cv) and self.cv > 0, f"cv must be > 0, got {self.cv}")

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2  # a gamma's cv is 1 / sqrt(shape)
        return rng.gamma(shape, 1.0 / (self.rate * shape), n)


Arrival = Poisson | Gamma


# --- length distributions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fixed:
    tokens: int

    def __post_init__(self) -> None:
        _check(self.tokens >= 1, f"tokens must be >= 1, got {self.tokens}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers from `low` to `high`, both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check(1 <= self.low <= self.high, f"need 1 <= low <= high, got low={self.low}, high={self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, n, endpoint=True)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Log-normal lengths given by their median and mean, the two numbers trace summaries report.

    The mean must be at least the median (a log-normal is right-skewed). Samples are rounded, at least 1, and
    at most `cap` when given (e.g. the model's context length).
    """

    median: float
    mean: float
    cap: int | None = None

    def __post_init__(self) -> None:
        _check(0 < self.median <= self.mean, f"need 0 < median <= mean, got {self.median}, {self.mean}")
        _check(math.isfinite(self.mean), f"mean must be finite, got {self.mean}")
        _check(self.cap is None or self.cap >= 1, f"cap must be >= 1, got {self.cap}")

    @property
    def sigma(self) -> float:
        # mean / median = exp(sigma^2 / 2) for a log-normal
        return math.sqrt(2.0 * math.log(self.mean / self.median))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        tokens = np.rint(rng.lognormal(math.log(self.median), self.sigma, n))
        return np.clip(tokens, 1, self.cap or _MAX_TOKENS).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Zipf:
    """P(k) proportional to k^-a for k = 1..high: mostly short, with a heavy tail up to `high`."""

    a: float
    high: int

    def __post_init__(self) -> None:
        _check(math.isfinite(self.a) and self.a > 0, f"a must be > 0, got {self.a}")
        _check(self.high >= 1, f"high must be >= 1, got {self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = np.arange(1, self.high + 1, dtype=np.int64)
        weights = k.astype(np.float64) ** -self.a
        return rng.choice(k, n, p=weights / weights.sum())


@dataclass(frozen=True, slots=True, repr=False)
class Empirical:
    """Lengths drawn with replacement from observed ones, e.g. ``Empirical.prompts(read_trace(path))``.

    Prompt and output lengths drawn this way are independent of each other; `resample` keeps them paired.
    """

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        _check(len(self.values) > 0, "an empirical distribution needs at least one value")
        _check(min(self.values) >= 1, f"lengths must be >= 1, got {min(self.values)}")

    def __repr__(self) -> str:
        return f"Empirical(<{len(self.values)} values, mean {sum(self.values) / len(self.values):.1f}>)"

    @classmethod
    def prompts(cls, trace: Trace) -> Empirical:
        return cls(tuple(r.prompt_tokens for r in trace.requests))

    @classmethod
    def outputs(cls, trace: Trace) -> Empirical:
        return cls(tuple(_output_of(r) for r in trace.requests))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), n)


Lengths = Fixed | Uniform | LogNormal | Zipf | Empirical


def _output_of(request: RequestArrival) -> int:
    if request.output_tokens is None:
        raise ValueError(f"request {request.request_id} has no known output length to resample")
    return request.output_tokens


# --- workloads -----------------------------------------------------------------------------------


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    arrival, prompt, output = np.random.SeedSequence(seed).spawn(3)
    return np.random.default_rng(arrival), np.random.default_rng(prompt), np.random.default_rng(output)


def _arrival_times(arrival: Arrival, rng: np.random.Generator, n: int) -> list[float]:
    # The first request arrives at t = 0, as in a trace read from a file.
    gaps = arrival.gaps(rng, max(n - 1, 0))
    return np.concatenate(([0.0], np.cumsum(gaps)))[:n].tolist()


def _trace(times: list[float], prompts: list[int], outputs: list[int]) -> Trace:
    requests = [
        RequestArrival(str(i), time, prompt, output)
        for i, (time, prompt, output) in enumerate(zip(times, prompts, outputs, strict=True), 1)
    ]
    return Trace(source=None, format="synthetic", requests=requests)


def generate(n: int, *, arrival: Arrival, prompt: Lengths, output: Lengths, seed: int = 0) -> Trace:
    """`n` requests with ids "1".."n", arriving from t = 0 by `arrival`, lengths drawn independently."""
    _check(n >= 0, f"n must be >= 0, got {n}")
    arrival_rng, prompt_rng, output_rng = _streams(seed)
    return _trace(
        _arrival_times(arrival, arrival_rng, n),
        prompt.sample(prompt_rng, n).tolist(),
        output.sample(output_rng, n).tolist(),
    )


def resample(trace: Trace, n: int, *, arrival: Arrival, seed: int = 0) -> Trace:
    """`n` requests whose (prompt, output) pairs are drawn with replacement from `trace`, at new arrivals.

    Pairs stay together because scheduling cares about their correlation (long prompts, short answers).
    Prefix hashes are dropped: repeating a request's hashes would invent prefix sharing the trace never had.
    """
    _check(n >= 0, f"n must be >= 0, got {n}")
    _check(len(trace) > 0, "cannot resample an empty trace")
    arrival_rng, pick_rng, _ = _streams(seed)
    picked = [trace.requests[i] for i in pick_rng.integers(0, len(trace), n)]
    return _trace(
        _arrival_times(arrival, arrival_rng, n),
        [r.prompt_tokens for r in picked],
        [_output_of(r) for r in picked],
    )
