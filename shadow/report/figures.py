"""The report's figures, as PNG bytes (the HTML inlines them). The optimal-against-vLLM schedule figure is
`shadow optimal --plot`'s own drawing, on the window where the optimum is furthest from the engine."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vllm_shadow.evaluation.evaluate import optimal_problem
from vllm_shadow.report.analysis import StreamAnalysis
from vllm_shadow.report.schedule_plot import plot_schedules
from vllm_shadow.solver.optimal import GPU_COST, run_heuristics, solve_optimal


def _png(fig: plt.Figure) -> bytes:
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def shown_candidates(analysis: StreamAnalysis, count: int = 5) -> list[str]:
    """The current configuration, then the candidates with the best evidence."""
    ranked = [e.label for e in analysis.verdict.evidence][:count]
    return [analysis.candidates[0].label, *ranked]


def latency_figure(analysis: StreamAnalysis) -> bytes:
    labels = shown_candidates(analysis)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(labels) + 1.5), sharey=True)
    for axis, metric, unit in ((axes[0], "ttft", "TTFT (s)"), (axes[1], "tpot", "TPOT (ms)")):
        scale = 1e3 if metric == "tpot" else 1.0
        data = [
            [v * scale for r in analysis.simulated_requests[label] if not math.isnan(v := getattr(r, metric))]
            or [math.nan]
            for label in labels
        ]
        axis.boxplot(data, orientation="horizontal", showfliers=False, widths=0.6)
        axis.set_xlabel(unit)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(1, len(labels) + 1), [_short(label) for label in labels], fontsize=8)
    axes[0].get_yticklabels()[0].set_fontweight("bold")  # the engine's own configuration
    fig.suptitle("Simulated latency of every window's own requests, per configuration (boxes: quartiles)")
    return _png(fig)


def gap_figure(analysis: StreamAnalysis) -> bytes:
    evaluations = analysis.evaluations
    t0 = evaluations[0].start_time
    x = [e.start_time - t0 for e in evaluations]
    fig, axis = plt.subplots(figsize=(12, 3.6))
    for label in shown_candidates(analysis)[1:4]:
        axis.plot(x, [100 * e.gap(label, "gpu") for e in evaluations], marker=".", label=_short(label))
    axis.plot(
        x,
        [100 * e.constrained_gap for e in evaluations],
        color="black",
        marker=".",
        label="optimal bound at equal latency (any scheduler, the same service)",
    )
    axis.plot(
        x,
        [100 * e.optimal_gap for e in evaluations],
        color="grey",
        linestyle="--",
        marker=".",
        label="optimal bound, latency ignored",
    )
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xlabel("window start (s of engine time)")
    axis.set_ylabel("GPU-time gap (%)")
    axis.set_title("Cost gap per window: (current - candidate) / current; above 0 the candidate saves")
    axis.legend(fontsize=8, loc="best")
    axis.grid(alpha=0.3)
    return _png(fig)


def kv_figure(analysis: StreamAnalysis) -> bytes:
    steps = analysis.steps
    t0 = steps[0].start_time
    fig, axis = plt.subplots(figsize=(12, 3.2))
    axis.step(
        [s.start_time - t0 for s in steps], [s.kv_blocks_used for s in steps], where="post", linewidth=0.8
    )
    axis.axhline(
        analysis.info.num_kv_blocks - 1, color="black", linestyle="--", linewidth=0.8, label="capacity"
    )
    preempting = [s for s in steps if s.preempted]
    axis.plot(
        [s.start_time - t0 for s in preempting],
        [s.kv_blocks_used for s in preempting],
        "rv",
        markersize=5,
        label=f"preemption ({sum(len(s.preempted) for s in preempting)})",
    )
    axis.set_xlabel("engine time (s)")
    axis.set_ylabel("KV blocks in use")
    axis.set_title("KV cache use on the engine, step by step (as mirrored)")
    axis.legend(fontsize=8, loc="upper right")
    return _png(fig)


def schedule_figure(
    analysis: StreamAnalysis, max_requests: int, time_limit: float
) -> tuple[bytes, str] | None:
    """The optimal schedule against the engine's configuration on the window with the largest optimal gap
    (among windows small enough to solve), and that window's description."""
    solvable = [
        (e, w)
        for e, w in zip(analysis.evaluations, analysis.windows, strict=True)
        if e.optimal is not None and e.optimal.method == "cp-sat" and not math.isnan(e.optimal_gap)
    ]
    solvable = [(e, w) for e, w in solvable if len(optimal_problem(w).requests) <= max_requests]
    if not solvable:
        return None
    evaluation, window = max(solvable, key=lambda pair: pair[0].optimal_gap)
    problem = optimal_problem(window)
    current = run_heuristics(problem, window.cost, GPU_COST, [evaluation.current])[0]
    optimum = solve_optimal(
        problem, window.cost, GPU_COST, time_limit=time_limit, hints={current.policy: current.schedule}
    )
    title = (
        f"window {window.index}: {len(problem.requests)} requests, {problem.limits.kv_blocks} KV blocks; "
        f"optimal {optimum.status}, bound {optimum.bound:.3f} GPU s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedule.png"
        plot_schedules(
            str(path),
            problem,
            [
                ("vLLM as configured", current.schedule, current.replay),
                ("optimal", optimum.schedule, optimum.replay),
            ],
            title,
        )
        return path.read_bytes(), title


def _short(label: str) -> str:
    """A policy label without the settings every candidate shares with the engine's."""
    return label.replace("max_num_seqs=", "seqs=").replace("max_num_batched_tokens=", "tokens=")
