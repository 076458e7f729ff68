"""The optimal schedule against another, drawn: KV use and batch composition over GPU-busy time.

Used by `shadow optimal --plot` and by the HTML report.
"""

from __future__ import annotations

import numpy as np

from vllm_shadow.solver.problem import Window
from vllm_shadow.solver.schedule import Replay, Schedule


def batch_composition(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Per batch: sequences decoding (one token) and tokens prefilled or recomputed (chunks of more than one)."""
    decodes = np.array([sum(n == 1 for n in b.tokens.values()) for b in schedule.batches])
    prefill = np.array([sum(n for n in b.tokens.values() if n > 1) for b in schedule.batches])
    return decodes, prefill


def plot_schedules(
    path: str, window: Window, schedules: list[tuple[str, Schedule, Replay]], title: str
) -> None:
    """KV use and batch composition of each schedule against GPU-busy time (idle gaps left out, so that each
    curve's length is its GPU cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:orange", "tab:blue", "tab:green"]
    fig, axes = plt.subplots(1 + len(schedules), 1, figsize=(12, 3.2 * (1 + len(schedules))), sharex=True)
    kv_axis = axes[0]
    for (name, _schedule, replay), color in zip(schedules, colors, strict=False):
        durations = np.array([b.duration for b in replay.batches])
        busy = np.concatenate([[0.0], np.cumsum(durations)])
        kv = np.array([b.kv_blocks for b in replay.batches])
        kv_axis.stairs(
            kv,
            busy,
            color=color,
            linewidth=1.2,
            label=f"{name}: {replay.gpu_seconds:.2f} GPU s, {len(durations)} batches",
        )
    kv_axis.axhline(
        window.limits.kv_blocks, color="black", linestyle="--", linewidth=0.8, label="KV capacity"
    )
    kv_axis.set_ylabel("KV blocks in use")
    kv_axis.legend(loc="upper right", fontsize=8)
    kv_axis.set_title(title, fontsize=10)
    for axis, (name, schedule, replay), color in zip(axes[1:], schedules, colors, strict=False):
        durations = np.array([b.duration for b in replay.batches])
        busy = np.concatenate([[0.0], np.cumsum(durations)])
        decodes, prefill = batch_composition(schedule)
        axis.stairs(decodes, busy, fill=True, color=color, alpha=0.6, label="sequences decoding")
        axis.set_ylabel(f"{name}\nsequences decoding")
        tokens = axis.twinx()
        # A prefill batch is as wide as it is long: outlined, so the decode stretches under it stay visible.
        tokens.stairs(prefill, busy, color="black", linewidth=0.8, label="prefill / recompute tokens")
        tokens.set_ylabel("prefill tokens")
        evictions = [busy[j] for j, b in enumerate(schedule.batches) if b.evicted]
        if evictions:
            axis.plot(evictions, [0] * len(evictions), "rv", markersize=5, label="preemption")
        handles = axis.get_legend_handles_labels()
        more = tokens.get_legend_handles_labels()
        axis.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)
    axes[-1].set_xlabel("GPU-busy time (s): batches back to back, idle left out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
