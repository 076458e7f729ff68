"""What a person reads: a snapshot as rich tables (`shadow status`, the demo's live view and its summary)."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from vllm_shadow.evaluation.results import ENGINE_LATENCY, CandidateOutcome, WindowEvaluation
from vllm_shadow.readout.snapshot import EngineSnapshot, ShadowSnapshot


def _pct(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


def _num(value: float, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * scale:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def header(snapshot: ShadowSnapshot) -> Text:
    events = sum(snapshot.events.values())
    lost = sum(sum(r.values()) for r in snapshot.refused.values()) + sum(snapshot.unattributed_drops.values())
    where = "  ".join(f"{k} {v}" for k, v in sorted(snapshot.addresses.items()))
    return Text.from_markup(
        f"[bold]vLLM shadow[/] up {_duration(snapshot.taken_at - snapshot.started_at)}  |  "
        f"{events:,} events in {sum(snapshot.batches.values()):,} batches ({lost:,} refused or unattributed)  |  "
        f"windows: {snapshot.windows_evaluated} evaluated, {snapshot.queued_windows} queued, "
        f"{snapshot.in_flight_windows} evaluating" + (f"\n[dim]{where}[/]" if where else "")
    )


def engines_table(snapshot: ShadowSnapshot) -> Table:
    table = Table(title="engines", title_justify="left", header_style="bold")
    for column in (
        "engine",
        "feed",
        "steps",
        "requests live/done/lost",
        "windows done/skipped",
        "steps replayed exactly",
        "replay GPU err",
        "cost model err",
        "lag s",
    ):
        table.add_column(column, justify="left" if column in ("engine", "feed") else "right", no_wrap=True)
    for e in snapshot.engines:
        t = e.tracker
        lost = t.requests_timed_out + t.requests_abandoned + t.requests_rejected + t.unknown_requests
        skipped = sum(e.windows_skipped.values())
        fidelity = e.last.fidelity if e.last is not None else None
        table.add_row(
            f"{e.model_name.rsplit('/', 1)[-1]}[{e.engine}]",
            e.mode,
            f"{t.steps:,}",
            f"{e.live_requests}/{t.requests_finished}/{lost}",
            f"{e.windows_evaluated}/{skipped}",
            _pct(fidelity.step_match_ratio) if fidelity else "-",
            _pct(fidelity.gpu_error_ratio) if fidelity else "-",
            _pct(e.cost_error),
            _num(e.ingest_lag_seconds),
        )
    return table


def window_table(engine: EngineSnapshot, last: WindowEvaluation, rows: int = 8) -> Table:
    """The last window's configurations, best GPU gap first, with the current one and the optimum."""
    table = Table(
        title=f"window {last.index} of {engine.model_name.rsplit('/', 1)[-1]}[{engine.engine}]: "
        f"{last.requests} requests (+{last.carried} carried in), {last.engine_steps} engine steps, "
        f"measured busy {last.actual_gpu_seconds:.2f}s",
        title_justify="left",
        header_style="bold",
    )
    for column in ("configuration", "GPU s", "GPU gap", "TTFT p99 s", "TPOT p99 ms", "SLO", "preempt"):
        table.add_column(column, justify="left" if column == "configuration" else "right", no_wrap=True)
    current = last.fidelity.self_replay
    others = sorted(last.candidates, key=lambda o: (math.isnan(o.gpu_seconds), o.gpu_seconds))
    shown = [current, *others[: rows - 1]]
    for outcome in shown:
        latency = outcome.latency
        label = outcome.label + (" [dim](current)[/]" if outcome is current else "")
        table.add_row(
            label,
            _num(outcome.gpu_seconds, digits=3),
            _pct(last.gap(outcome.label, "gpu"), signed=True),
            _num(latency.ttft[2]) if latency else "-",
            _num(latency.tpot[2], 1e3, 1) if latency else "-",
            _pct(latency.slo_attainment) if latency else "-",
            str(outcome.preemptions),
        )
    # The bound at equal latency first: it is the one an operator can act on.
    for opt, gap, what in (
        (last.constrained, last.constrained_gap, "at equal latency"),
        (last.optimal, last.optimal_gap, "latency ignored"),
    ):
        if opt is not None:
            table.add_row(
                f"[italic]optimal bound, {what} ({opt.method}, {opt.status})[/]",
                _num(opt.bound_gpu_seconds, digits=3),
                _pct(gap, signed=True),
                "",
                "",
                "",
                "",
            )
    if last.recompute.preemptions or last.recompute.gpu_seconds:
        table.caption = recompute_line(last)
    return table


def cheapest_candidate(last: WindowEvaluation) -> CandidateOutcome | None:
    """The configuration other than the current one that served the window in the least simulated GPU time."""
    ran = [o for o in last.candidates if not o.error and not math.isnan(o.gpu_seconds)]
    return min(ran, key=lambda o: o.gpu_seconds) if ran else None


def recompute_line(last: WindowEvaluation | EngineSnapshot) -> str:
    """The recompute tax of a window, or of an engine over its evaluated windows; a window's beside what its
    recomputation would have cost, simulated on the same cost model, under the current configuration (the self
    replay) and under the cheapest candidate."""
    tax, measured = last.recompute, last.actual_gpu_seconds
    share = tax.gpu_seconds / measured if measured > 0 else math.nan
    line = (
        f"recompute tax: {tax.preemptions} preemptions, {tax.recomputed_tokens:,} tokens computed again, "
        f"{tax.gpu_seconds:.3f}s of busy time ({_pct(share)} of the measured)"
    )
    if not isinstance(last, WindowEvaluation):
        return line
    simulated = []
    replay = last.fidelity.self_replay
    if not replay.error:
        simulated.append(f"{replay.recompute_gpu_seconds:.3f}s under the current configuration")
    cheapest = cheapest_candidate(last)
    if cheapest is not None:
        simulated.append(
            f"{cheapest.recompute_gpu_seconds:.3f}s under the cheapest candidate {cheapest.label}"
        )
    return f"{line}; simulated: {', '.join(simulated)}" if simulated else line


def optimal_lines(last: WindowEvaluation) -> list[str]:
    """The optimal bounds of a window in words, the one at equal latency first."""
    lines = []
    if last.constrained is not None:
        latency = (
            "every request served no later than by the current configuration"
            if last.constrained.latency == ENGINE_LATENCY
            else f"every request within the SLO ({last.constrained.latency})"
        )
        lines.append(
            f"optimal bound at equal latency, last window: with {latency}, no scheduler could serve it in less "
            f"than {last.constrained.bound_gpu_seconds:.3f}s of busy time "
            f"({_pct(last.constrained_gap)} below the current configuration's replay)"
        )
    if last.optimal is not None:
        lines.append(
            f"optimal bound with latency ignored (requests delayed without limit), last window: "
            f"{last.optimal.bound_gpu_seconds:.3f}s ({_pct(last.optimal_gap)} below the current configuration's "
            f"replay)"
        )
    return lines


def verdict_text(engine: EngineSnapshot) -> Text:
    verdict = engine.verdict
    name = f"{engine.model_name.rsplit('/', 1)[-1]}[{engine.engine}]"
    if verdict is None:
        return Text.from_markup(f"[bold]{name}[/]: no window evaluated yet")
    if verdict.recommendation is None:
        return Text.from_markup(f"[bold]{name}[/]: [yellow]no recommendation[/]: {verdict.reason}")
    return Text.from_markup(f"[bold]{name}[/]: [green]recommend[/] {verdict.recommendation.describe()}")


def evidence_table(engine: EngineSnapshot, rows: int = 6) -> Table | None:
    verdict = engine.verdict
    if verdict is None or not verdict.evidence:
        return None
    table = Table(title="evidence over recent windows", title_justify="left", header_style="bold")
    for column in ("configuration", "windows", "won", "mean gain", "± stderr", "lower bound", "vLLM flags?"):
        table.add_column(column, justify="left" if column == "configuration" else "right", no_wrap=True)
    for e in verdict.evidence[:rows]:
        table.add_row(
            e.label,
            str(e.windows),
            str(e.wins),
            _pct(e.mean_gain, signed=True),
            _pct(e.stderr) if math.isfinite(e.stderr) else "-",
            _pct(e.lower_bound, signed=True) if math.isfinite(e.lower_bound) else "-",
            "yes" if e.actionable else "no",
        )
    return table


def status_view(snapshot: ShadowSnapshot) -> RenderableType:
    parts: list[RenderableType] = [header(snapshot), engines_table(snapshot)]
    for engine in snapshot.engines:
        if engine.last is not None:
            parts.append(window_table(engine, engine.last))
        parts.append(verdict_text(engine))
    return Group(*parts)


def summary_view(snapshot: ShadowSnapshot) -> RenderableType:
    parts: list[RenderableType] = [header(snapshot), engines_table(snapshot)]
    for engine in snapshot.engines:
        table = evidence_table(engine)
        if table is not None:
            parts.append(table)
        if engine.last is not None:
            parts.extend(Text(line) for line in optimal_lines(engine.last))
        if engine.windows_evaluated:
            parts.append(Text(f"{recompute_line(engine)}, over the evaluated windows"))
        parts.append(verdict_text(engine))
    return Group(*parts)
