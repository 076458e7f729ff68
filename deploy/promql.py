"""The PromQL the dashboards and the rules share, written once and rendered for either.

A `Scope` says where an expression runs. In a dashboard the metric prefixes are Grafana variables (so one
dashboard serves the shadow scraped directly, `vllm_shadow_*`, and through Ray's metrics agent,
`ray_vllm_shadow_*`) and every engine series is filtered by the `model_name` and `engine` variables; in a rule
file the prefixes are fixed and nothing is filtered. Expressions aggregate `by (model_name, engine)` so that
the labels a scrape adds (job, instance, Ray's node and session labels) never break a join.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_shadow.tracking.reasons import SkipReason

ENGINE = "model_name, engine"
# Candidates vLLM can run by changing flags are the `vllm(...)` policies (vllm_shadow.evaluation.candidates).
# `[(]` matches a parenthesis without a backslash, which would need escaping differently in YAML, JSON and
# PromQL strings.
ACTIONABLE = 'candidate=~"vllm[(].*"'


@dataclass(frozen=True, slots=True)
class Scope:
    shadow: str  # prefix of the shadow's series: vllm_shadow_, ray_vllm_shadow_, or a Grafana variable
    vllm: str  # prefix of vLLM's own series: vllm: directly, ray_vllm_ through Ray Serve LLM
    selector: str = ""  # matchers every per-engine series gets
    window: str = "5m"  # the range of rate() and *_over_time()

    def s(self, name: str, *matchers: str) -> str:
        """A shadow series with this scope's selector and `matchers`."""
        return _series(self.shadow + name, (self.selector, *matchers))

    def v(self, name: str, *matchers: str) -> str:
        """One of vLLM's series, filtered like the shadow's."""
        return _series(self.vllm + name, (self.selector, *matchers))

    def rate(self, series: str) -> str:
        return f"rate({series}[{self.window}])"


def _series(name: str, matchers: tuple[str, ...]) -> str:
    inner = ", ".join(m for m in matchers if m)
    return f"{name}{{{inner}}}" if inner else name


def _named(regex: str, selector: str) -> str:
    """A selector whose metric name is a regex."""
    return "{" + ", ".join(m for m in (f'__name__=~"{regex}"', selector) if m) + "}"


# ---- costs: what each configuration would have spent, from the counters (smooth over any range) ------------


def candidate_gpu_rate(s: Scope, *matchers: str) -> str:
    """Simulated GPU seconds per second, per configuration."""
    return f"sum by ({ENGINE}, candidate) ({s.rate(s.s('simulated_gpu_seconds_total', *matchers))})"


def current_gpu_rate(s: Scope) -> str:
    """The self replay's GPU seconds per second: the candidate that `config_info` names as the engine's own."""
    current = f"max by ({ENGINE}, candidate) ({s.s('config_info')})"
    return (
        f"sum by ({ENGINE}) ({s.rate(s.s('simulated_gpu_seconds_total'))} "
        f"* on({ENGINE}, candidate) group_left() {current})"
    )


def gpu_gap(s: Scope, *matchers: str) -> str:
    """(current - candidate) / current GPU time over the range, per candidate: positive saves GPU time."""
    return f"1 - {candidate_gpu_rate(s, *matchers)} / on({ENGINE}) group_left() {current_gpu_rate(s)}"


def best_gpu_gap(s: Scope) -> str:
    """The largest gap among the configurations vLLM can be switched to by flags."""
    return f"max by ({ENGINE}) ({gpu_gap(s, ACTIONABLE)})"


def optimal_gpu_gap(s: Scope) -> str:
    """Unconstrained: the most any scheduler could have saved however late it served the requests."""
    bound = f"sum by ({ENGINE}) ({s.rate(s.s('optimal_bound_gpu_seconds_total'))})"
    return f"1 - {bound} / {current_gpu_rate(s)}"


def constrained_gpu_gap(s: Scope) -> str:
    """The headline: the most any scheduler could have saved serving every request at equal or better latency
    (no later than the engine's configuration, or within the SLO)."""
    bound = f"sum by ({ENGINE}) ({s.rate(s.s('optimal_constrained_bound_gpu_seconds_total'))})"
    return f"1 - {bound} / {current_gpu_rate(s)}"


def recompute_share(s: Scope) -> str:
    """The recompute tax: the share of the engine's measured busy time (evaluated windows) it spent computing
    again the KV of preempted requests."""
    tax = f"sum by ({ENGINE}) ({s.rate(s.s('recompute_gpu_seconds_total'))})"
    return f"{tax} / on({ENGINE}) {measured_gpu_rate(s)}"


def measured_gpu_rate(s: Scope) -> str:
    """The engine's measured busy time over the evaluated windows, per second."""
    return f"sum by ({ENGINE}) ({s.rate(s.s('evaluated_gpu_seconds_total'))})"


def gpu_saving_rate(s: Scope) -> str:
    """GPU seconds per second the recommendation would save: its expected gain on the measured busy time."""
    return (
        f"sum by ({ENGINE}) ({s.rate(s.s('actual_gpu_seconds_total'))}) "
        f"* on({ENGINE}) max by ({ENGINE}) ({s.s('recommendation_expected_gain_ratio')})"
    )


# ---- the recommendation --------------------------------------------------------------------------------------


def recommendation(s: Scope) -> str:
    """One row per engine with a recommendation: its flags, objective and confidence as labels, its expected
    gain as the value."""
    info = f"max by ({ENGINE}, candidate, flags, objective, confidence) ({s.s('recommendation_info')})"
    gain = f"max by ({ENGINE}) ({s.s('recommendation_expected_gain_ratio')})"
    return f"{info} * on({ENGINE}) group_left() {gain}"


# ---- fidelity --------------------------------------------------------------------------------------------------


def step_match(s: Scope) -> str:
    """Share of engine steps the self replay reproduced, averaged over the range (the worst sender)."""
    return f"min by ({ENGINE}) (avg_over_time({s.s('self_replay_step_match_ratio')}[{s.window}]))"


def replay_gpu_error(s: Scope) -> str:
    """Relative error of the self replay's busy time, averaged over the range."""
    return f"max by ({ENGINE}) (avg_over_time({s.s('self_replay_gpu_error_ratio')}[{s.window}]))"


# ---- ingest ----------------------------------------------------------------------------------------------------


def events_rate(s: Scope) -> str:
    """Mirror events per second the shadow applied, per engine."""
    return f"sum by ({ENGINE}) ({s.rate(s.s('engine_events_total'))})"


def lost_rate(s: Scope) -> str:
    """Events dropped (sender queue, too late) and batches lost in transit, per second."""
    return (
        f"sum by ({ENGINE}) ({s.rate(s.s('events_dropped_total'))}) "
        f"+ on({ENGINE}) sum by ({ENGINE}) ({s.rate(s.s('batches_lost_total'))})"
    )


def backlog_skip_rate(s: Scope) -> str:
    """Windows the evaluation stage gave up on (queue full, time-out) per second. The exporter emits every
    skip reason from the start, so this is 0, not absent, for an engine that never skipped."""
    given_up = "|".join((SkipReason.EVALUATION_BACKLOG, SkipReason.EVALUATION_TIMEOUT))
    skipped = s.s("windows_skipped_total", f'reason=~"{given_up}"')
    return f"sum by ({ENGINE}) ({s.rate(skipped)})"


def evaluation_mean_seconds(s: Scope) -> str:
    """Mean wall time to evaluate a window. Directly scraped it is a histogram (`_sum`, `_count`); through Ray
    it is two counters (`evaluation_seconds_total`, `evaluations_total`, see vllm_shadow.readout.ray_metrics): the name
    regexes take whichever exists, so one expression serves both."""
    total = _named(f"{s.shadow}evaluation_seconds_(sum|total)", s.selector)
    count = _named(f"{s.shadow}(evaluation_seconds_count|evaluations_total)", s.selector)
    return f"sum by ({ENGINE}) ({s.rate(total)}) / sum by ({ENGINE}) ({s.rate(count)})"


# ---- joins with vLLM's own series --------------------------------------------------------------------------


def vllm_requests_rate(s: Scope) -> str:
    """Requests vLLM reports finished, per second."""
    return f"sum by ({ENGINE}) ({s.rate(s.v('request_success_total'))})"


def mirror_coverage(s: Scope) -> str:
    """Requests the shadow saw finish over requests vLLM reports finished: 1 when the mirror misses nothing."""
    seen = f"sum by ({ENGINE}) ({s.rate(s.s('requests_finished_total'))})"
    return f"{seen} / on({ENGINE}) {vllm_requests_rate(s)}"


def vllm_prefix_cache_hit_ratio(s: Scope) -> str:
    """vLLM's own prefix-cache hit rate: prompt tokens found cached over prompt tokens looked up (0, not NaN,
    for an engine that looks nothing up: caching off, or idle)."""
    hits = f"sum by ({ENGINE}) ({s.rate(s.v('prefix_cache_hits_total'))})"
    queries = f"sum by ({ENGINE}) ({s.rate(s.v('prefix_cache_queries_total'))})"
    return f"{hits} / on({ENGINE}) clamp_min({queries}, 1e-9)"


def vllm_ttft_quantile(s: Scope, quantile: str) -> str:
    """vLLM's own TTFT quantile over the range, from its histogram."""
    buckets = s.rate(s.v("time_to_first_token_seconds_bucket"))
    return f"histogram_quantile({quantile}, sum by ({ENGINE}, le) ({buckets}))"
