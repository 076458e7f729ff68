"""Recording and alerting rules for the shadow, rendered for the native names and for Ray's `ray_` names.

Both rule files record into the same `engine:vllm_shadow_*` series, so the alerts (and anything else built on
the recorded series) do not care how the shadow is scraped. Load one of the two files, not both.

Each alert is a `signal` compared with a threshold, optionally with a `guard` that removes engines for which
the alert would mislead: the real-Prometheus test checks that every signal returns data from a running shadow,
and the promtool unit tests (deploy/prometheus/tests) check when each alert fires.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy import promql
from deploy.promql import Scope

# Recorded series (level:metric:operations, as the Prometheus naming practice has it).
GAP = "engine_candidate:vllm_shadow_gpu_gap:ratio_rate30m"
BEST_GAP = "engine:vllm_shadow_gpu_gap_best:ratio_rate30m"
OPTIMAL_GAP = "engine:vllm_shadow_gpu_gap_optimal:ratio_rate30m"  # latency ignored
# The headline: the gap to the optimal bound at equal or better latency.
OPTIMAL_GAP_EQUAL_LATENCY = "engine:vllm_shadow_gpu_gap_optimal_equal_latency:ratio_rate30m"
RECOMPUTE_SHARE = "engine:vllm_shadow_recompute_share:ratio_rate30m"
STEP_MATCH = "engine:vllm_shadow_self_replay_step_match:avg30m"
REPLAY_ERROR = "engine:vllm_shadow_self_replay_gpu_error:avg30m"
EVENTS = "engine:vllm_shadow_events:rate5m"
LOST = "engine:vllm_shadow_events_lost:rate10m"
GIVEN_UP = "engine:vllm_shadow_windows_given_up:rate15m"
VLLM_REQUESTS = "engine:vllm_requests:rate5m"

# Thresholds. The step-match floor is the recommender's own
# (vllm_shadow.evaluation.recommend.Goal.min_step_match): below it the shadow stops recommending, and the
# dashboards should say why.
GAP_THRESHOLD = 0.10
STEP_MATCH_FLOOR = 0.95
REPLAY_ERROR_CEILING = 0.25
ON_ENGINE = "on(model_name, engine)"


@dataclass(frozen=True, slots=True)
class Recording:
    record: str
    expr: str


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    signal: str  # what is measured; returns a value per engine whenever the shadow reports on it
    condition: str  # comparison with the threshold, e.g. "> 0.1"
    hold: str  # the rule's `for`
    severity: str
    summary: str
    description: str
    guard: str = ""  # e.g. "unless on(...) (...)": engines for which the alert would mislead

    @property
    def expr(self) -> str:
        expr = f"{self.signal} {self.condition}"
        return f"({expr}) {self.guard}" if self.guard else expr


@dataclass(frozen=True, slots=True)
class Flavour:
    """How the shadow and vLLM are scraped: directly, or through Ray's metrics agent."""

    name: str
    filename: str
    shadow: str
    vllm: str

    def scope(self, window: str) -> Scope:
        return Scope(shadow=self.shadow, vllm=self.vllm, window=window)


NATIVE = Flavour("native", "vllm-shadow.rules.yml", "vllm_shadow_", "vllm:")
RAY = Flavour("ray", "vllm-shadow-ray.rules.yml", "ray_vllm_shadow_", "ray_vllm_")
FLAVOURS = (NATIVE, RAY)


def recordings(flavour: Flavour) -> list[Recording]:
    slow, fast = flavour.scope("30m"), flavour.scope("5m")
    return [
        Recording(GAP, promql.gpu_gap(slow)),
        Recording(BEST_GAP, promql.best_gpu_gap(slow)),
        Recording(OPTIMAL_GAP_EQUAL_LATENCY, promql.constrained_gpu_gap(slow)),
        Recording(OPTIMAL_GAP, promql.optimal_gpu_gap(slow)),
        Recording(RECOMPUTE_SHARE, promql.recompute_share(slow)),
        Recording(STEP_MATCH, promql.step_match(slow)),
        Recording(REPLAY_ERROR, promql.replay_gpu_error(slow)),
        Recording(EVENTS, promql.events_rate(fast)),
        Recording(LOST, promql.lost_rate(flavour.scope("10m"))),
        Recording(GIVEN_UP, promql.backlog_skip_rate(flavour.scope("15m"))),
        Recording(VLLM_REQUESTS, promql.vllm_requests_rate(fast)),
    ]


ENGINE_LABEL = "{{ $labels.model_name }} [{{ $labels.engine }}]"

ALERTS = [
    Alert(
        "VllmShadowGapSustained",
        BEST_GAP,
        f"> {GAP_THRESHOLD}",
        "1h",
        "info",
        f"{ENGINE_LABEL}: a flag change would save {{{{ $value | humanizePercentage }}}} of GPU time",
        "For an hour, a configuration reachable by vLLM flags would have served this engine's own traffic with "
        f"more than {GAP_THRESHOLD:.0%} less GPU time, on a self replay that reproduces the engine. See the "
        "shadow's recommendation (vllm_shadow_recommendation_info, or `shadow status`) for the flags.",
        guard=f"unless {ON_ENGINE} ({STEP_MATCH} < {STEP_MATCH_FLOOR})",
    ),
    Alert(
        "VllmShadowFidelityDegraded",
        STEP_MATCH,
        f"< {STEP_MATCH_FLOOR}",
        "30m",
        "warning",
        f"{ENGINE_LABEL}: the self replay reproduces only {{{{ $value | humanizePercentage }}}} of engine steps",
        "The simulator, run with the engine's own settings, no longer schedules like the engine: its what-ifs, "
        "gaps and recommendations for this engine are not to be trusted. Typical causes: a vLLM version or "
        "setting the simulator does not model (prefix caching, a new scheduler), or lost mirror events.",
    ),
    Alert(
        "VllmShadowSelfReplayInaccurate",
        REPLAY_ERROR,
        f"> {REPLAY_ERROR_CEILING}",
        "30m",
        "warning",
        f"{ENGINE_LABEL}: the self replay's GPU time is off by {{{{ $value | humanizePercentage }}}}",
        "The calibrated cost model misjudges this engine's step times: gains smaller than this error are not "
        "recommended. Check the cost-model error panel; a profile (`shadow profile`) may be needed.",
    ),
    Alert(
        "VllmShadowNoEvents",
        VLLM_REQUESTS,
        "> 0",
        "10m",
        "warning",
        f"{ENGINE_LABEL}: vLLM serves requests but the shadow receives no events from it",
        "vLLM reports finished requests for this engine while the shadow has applied no mirror event for it "
        "(or is not running). Check that the engine runs with --scheduler-cls vllm_shadow.MirrorScheduler and "
        "SHADOW_ADDRESS (or SHADOW_RAY_ACTOR), and that the shadow is up.",
        guard=f"unless {ON_ENGINE} ({EVENTS} > 0)",
    ),
    Alert(
        "VllmShadowLosingEvents",
        LOST,
        "> 0",
        "10m",
        "warning",
        f"{ENGINE_LABEL}: the shadow is losing mirror events ({{{{ $value | humanize }}}}/s)",
        "Events are dropped by the engine's bounded send queue, arrive too late, or batches are lost in transit. "
        "Windows built on lost events are skipped, so evidence accrues more slowly.",
    ),
    Alert(
        "VllmShadowEvaluationBehind",
        GIVEN_UP,
        "> 0",
        "15m",
        "warning",
        f"{ENGINE_LABEL}: the shadow gives up evaluating windows",
        "Windows are dropped from a full evaluation queue or cancelled at the evaluation time-out: the shadow "
        "needs more CPUs (Ray workers), fewer candidates, or a shorter optimal time limit.",
    ),
]


def rule_groups(flavour: Flavour) -> dict[str, object]:
    """The rule file's content, as promtool and Prometheus read it."""
    return {
        "groups": [
            {
                # No `interval`: the server's evaluation_interval applies (deploy/prometheus/prometheus.yml).
                "name": "vllm-shadow.recording",
                "rules": [{"record": r.record, "expr": r.expr} for r in recordings(flavour)],
            },
            {
                "name": "vllm-shadow.alerts",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.hold,
                        "labels": {"severity": a.severity},
                        "annotations": {"summary": a.summary, "description": a.description},
                    }
                    for a in ALERTS
                ],
            },
        ]
    }
