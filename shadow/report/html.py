"""The report as one HTML file: inline CSS, figures as data: URIs, no script and nothing fetched."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from html import escape

from vllm_shadow.evaluation.results import WindowEvaluation
from vllm_shadow.report.analysis import StreamAnalysis
from vllm_shadow.report.figures import gap_figure, kv_figure, latency_figure, schedule_figure

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1220px; color: #1d2330; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccd; }
.sub { color: #556; } .card { border-radius: 6px; padding: 12px 16px; margin: 12px 0; }
.yes { background: #e8f6ec; border: 1px solid #7cc08f; } .no { background: #f4f4f7; border: 1px solid #bbc; }
code { background: #eef; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 10px; border-bottom: 1px solid #e2e2ea; }
th { text-align: left; background: #f2f3f7; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0; }
"""


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1%}"


def _img(png: bytes, alt: str, element_id: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img id="{element_id}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def render(
    analysis: StreamAnalysis, source: str, *, optimal_max_requests: int, optimal_time_limit: float
) -> str:
    info, verdict, evaluations = analysis.info, analysis.verdict, analysis.evaluations
    steps_compared = sum(e.fidelity.steps_compared for e in evaluations)
    steps_matched = sum(e.fidelity.steps_matched for e in evaluations)
    requests = sum(e.requests for e in evaluations)
    recommendation = verdict.recommendation
    if recommendation is not None:
        flags = " ".join(recommendation.flags) or "(no flag change)"
        card = (
            f'<div id="recommendation" class="card yes"><b>Recommendation:</b> <code>{escape(flags)}</code><br>'
            f"{escape(recommendation.objective)} better by <b>{_pct(recommendation.expected_gain)}</b> "
            f"± {_pct(recommendation.gain_stderr)} (lower bound {_pct(recommendation.lower_bound)}) over "
            f"{recommendation.windows} windows, won {recommendation.wins}; self-replay error "
            f"{_pct(recommendation.replay_error)}, steps reproduced {_pct(recommendation.step_match)}; "
            f"<b>{recommendation.confidence}</b> confidence.</div>"
        )
    else:
        card = f'<div id="recommendation" class="card no"><b>No recommendation:</b> {escape(verdict.reason)}</div>'
    rows = "".join(
        f"<tr><td>{escape(e.label)}</td><td>{'yes' if e.actionable else 'no'}</td><td class=n>{e.windows}</td>"
        f"<td class=n>{_pct(e.mean_gain)}</td><td class=n>{_pct(e.stderr)}</td><td class=n>{_pct(e.lower_bound)}</td>"
        f"<td class=n>{e.wins}</td></tr>"
        for e in verdict.evidence[:12]
    )
    schedule = schedule_figure(analysis, optimal_max_requests, optimal_time_limit)
    schedule_html = (
        f"<p class=sub>{escape(schedule[1])}. Batches back to back (idle left out): each curve's length is its "
        f"GPU time.</p>{_img(schedule[0], 'optimal against vLLM schedule', 'schedule')}"
        if schedule
        else "<p>No window was small enough for the optimal solver.</p>"
    )
    flags = " ".join(analysis.candidates[0].policy.vllm_flags())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vLLM shadow report: {escape(info.model)}</title>
<style>{STYLE}</style></head><body>
<h1>vLLM shadow report</h1>
<div class=sub id="summary">{escape(source)} · model <code>{escape(info.model)}</code> engine {escape(info.engine)} ·
{info.num_kv_blocks} KV blocks of {info.block_size} tokens · settings <code>{escape(flags)}</code> ·
{len(evaluations)} windows, {requests} requests, {len(analysis.steps)} engine steps</div>
{card}
{_optimal_html(evaluations)}
<h2>Evidence</h2>
<p>Per candidate over the last windows: mean weighted gain over the self replay, its standard error and lower
confidence bound, and the windows it won. Only flag changes (actionable) can be recommended.</p>
<table id="evidence"><tr><th>candidate</th><th>actionable</th><th>windows</th><th>mean gain</th><th>stderr</th>
<th>lower bound</th><th>won</th></tr>{rows}</table>
<h2>Fidelity</h2>
<p id="fidelity">The simulator, run with the engine's own settings, reproduced <b>{steps_matched} of
{steps_compared}</b> engine steps ({_pct(steps_matched / steps_compared if steps_compared else math.nan)}).
Mean self-replay GPU-time error {_pct(_mean([e.fidelity.gpu_error_ratio for e in evaluations]))}, median TTFT
error {_pct(_mean([e.fidelity.ttft_error_ratio for e in evaluations]))}.</p>
<h2>Latency per candidate</h2>{_img(latency_figure(analysis), "latency distributions", "latency")}
<h2>Cost gap over time</h2>{_img(gap_figure(analysis), "cost gap per window", "gap")}
<h2>KV cache use</h2>{_img(kv_figure(analysis), "KV use", "kv")}
<h2>Optimal schedule against the engine's</h2>{schedule_html}
</body></html>
"""


def _window_gap(evaluations: list[WindowEvaluation], bound: Callable[[WindowEvaluation], float]) -> float:
    """1 - (sum of the bounds) / (sum of the self replays' GPU time) over the windows with a bound."""
    pairs = [(e.fidelity.self_replay.gpu_seconds, bound(e)) for e in evaluations]
    pairs = [(s, b) for s, b in pairs if not math.isnan(s + b)]
    replayed = sum(s for s, _ in pairs)
    return 1 - sum(b for _, b in pairs) / replayed if replayed > 0 else math.nan


def _optimal_html(evaluations: list[WindowEvaluation]) -> str:
    """The optimal gaps over every window, the one at equal latency first, and the engine's recompute tax."""
    nan = math.nan
    constrained = _window_gap(
        evaluations, lambda e: e.constrained.bound_gpu_seconds if e.constrained else nan
    )
    unconstrained = _window_gap(evaluations, lambda e: e.optimal.bound_gpu_seconds if e.optimal else nan)
    latency = next((e.constrained.latency for e in evaluations if e.constrained is not None), "")
    recompute = sum(e.recompute.gpu_seconds for e in evaluations)
    preemptions = sum(e.recompute.preemptions for e in evaluations)
    measured = sum(e.actual_gpu_seconds for e in evaluations)
    return (
        f'<p id="optimal"><b>Optimal at equal latency:</b> no scheduler could have served these windows in less '
        f"than <b>{_pct(1 - constrained) if not math.isnan(constrained) else '–'}</b> of the current "
        f"configuration's GPU time while serving every request no later than under "
        f"{escape(latency or 'the current configuration')} (a saving of at most <b>{_pct(constrained)}</b>). "
        f"With latency ignored (requests delayed without limit, a schedule no operator would run) the bound "
        f"is {_pct(unconstrained)} below. Recompute tax: {preemptions} preemptions cost the engine "
        f"{recompute:.3f}s of busy time ({_pct(recompute / measured if measured > 0 else nan)} of the measured)."
        f"</p>"
    )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
