"""Replay speed side by side with Microsoft's Vidur (MLSys'24), both run here, alternating, on the same slices.

Vidur 0.0.26 from PyPI runs in its own virtual environment (benchmarks/.vidur-venv, created on first use with
`python -m venv` and pip, reused afterwards) through benchmarks/vidur_driver.py, which serves Vidur's official
profiles of Llama-2-70B with TP 2 on A100s from benchmarks/data/vidur-profiling/full/ (MIT, see NOTICE.md there)
and fixes 0.0.26's assertion at its first preemption. The project's `simulate` runs in this process (loop) and in
fresh interpreters (whole process). Both replay the first 1,000 and 10,000 requests of the bundled Azure 2023
conversation trace (real arrival times; prompts clipped so that prompt + output <= 4,096 tokens, as Vidur's trace
reader does), under vLLM (batch cap 128, 4,096 tokens per batch) and Sarathi (chunk 512), on the KV capacity
Vidur's memory planner gives. Per round, each slice runs Vidur once and then each of the project's rows.

    python benchmarks/replay_speed.py            # prints the tables; --write updates RESULTS-replay.md

Loop: Vidur's event loop alone (after its predictors are loaded and its requests generated) against the project's
`simulate` call alone (every per-request record produced), in CPU and wall seconds. Process: the whole interpreter
from its start to its exit, CPU seconds and peak RSS from the kernel's accounting of that process (wait4), and wall
seconds. The report says which simulator core ran (`vllm_shadow.solver.simulator.COMPILED`;
VLLM_SHADOW_PURE_PYTHON=1 selects the pure-Python one). The whole Azure hour under 20 candidates follows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_shadow.adapters.events import RequestArrival
from vllm_shadow.adapters.traces import read_trace, resolve_trace
from vllm_shadow.costmodel.architecture import load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.roofline import roofline_prior
from vllm_shadow.solver import simulator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILES = HERE / "data" / "vidur-profiling" / "full"
VIDUR_VENV = HERE / ".vidur-venv"
VIDUR_WORK = VIDUR_VENV / "work"  # Vidur's trained predictors live here: later runs are warm
VIDUR_DRIVER = HERE / "vidur_driver.py"
# Vidur 0.0.26 imports plotly_express for its plots even with plots off; plotly 6 and kaleido 1 (which drives a
# Chrome) came after it.
VIDUR_PACKAGES = ("vidur==0.0.26", "kaleido==0.2.1", "plotly<6")
VIDUR_TRACE_DATE = "2023-08-21"  # Vidur's trace reader keeps the rows of one date, by default this one

TRACE = "azure-conv"
SIZES = (1_000, 10_000)
MODEL, HARDWARE, TP = "llama-2-70b", "a100", 2
BLOCK_SIZE = 16
MAX_TOKENS = 4_096  # per request: Vidur's trace reader clips prompts to it; also its vLLM batch token budget
BATCH_CAP = 128
CHUNK = 512


@dataclass(frozen=True, slots=True)
class Row:
    """One of the project's configurations, compared with the Vidur run of `vidur_scheduler`."""

    label: str
    vidur_scheduler: str  # "vllm" or "sarathi"
    policy: str


ROWS = (
    Row(
        "vLLM V0 (prefill-first)",
        "vllm",
        f"vllm-v0(max_num_seqs={BATCH_CAP},max_num_batched_tokens={MAX_TOKENS})",
    ),
    Row(
        "vLLM V1 (chunked prefill)",
        "vllm",
        f"vllm(max_num_seqs={BATCH_CAP},max_num_batched_tokens={MAX_TOKENS})",
    ),
    Row(
        "vLLM V1 + prefix caching",
        "vllm",
        f"vllm(max_num_seqs={BATCH_CAP},max_num_batched_tokens={MAX_TOKENS},enable_prefix_caching=true)",
    ),
    Row(
        "Sarathi (chunk 512)", "sarathi", f"sarathi(max_num_seqs={BATCH_CAP},max_num_batched_tokens={CHUNK})"
    ),
    Row(
        "Sarathi + prefix caching",
        "sarathi",
        f"sarathi(max_num_seqs={BATCH_CAP},max_num_batched_tokens={CHUNK},enable_prefix_caching=true)",
    ),
)
CANDIDATES_20 = [
    f"vllm(max_num_seqs={seqs},max_num_batched_tokens={tokens})"
    for seqs in (64, 128, 256)
    for tokens in (2048, 4096, 8192)
] + [
    "vllm(long_prefill_token_threshold=512)",
    "vllm(policy=priority)",
    "vllm(eviction=false)",
    "vllm-v0",
    "sarathi",
    "sarathi(max_num_batched_tokens=1024)",
    "orca",
    "lightllm",
    "sjf",
    "sof",
    "fastertransformer",
]


# ---- the work both simulators replay


def clip_like_vidur(requests: Iterable[RequestArrival], max_tokens: int) -> list[RequestArrival]:
    """The requests as Vidur's trace reader (TraceReplayRequestGenerator, 0.0.26) leaves them: at least one
    prompt and one output token, and the prompt shortened so that prompt + output <= `max_tokens`."""
    clipped = []
    for r in requests:
        output = max(1, r.output_tokens or 0)
        prompt = max(1, r.prompt_tokens) - max(0, max(1, r.prompt_tokens) + output - max_tokens)
        if prompt < 1:
            raise ValueError(f"request {r.request_id}: {output} output tokens leave no room for a prompt")
        if (prompt, output) != (r.prompt_tokens, r.output_tokens):
            r = dataclasses.replace(r, prompt_tokens=prompt, output_tokens=output)
        clipped.append(r)
    return clipped


def write_vidur_trace(requests: Sequence[RequestArrival], path: Path) -> None:
    """The layout Vidur 0.0.26's trace reader reads: Date, Time (seconds, repr: the float round-trips exactly),
    PromptTokenCount, CompletionTokenCount."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Date", "Time", "PromptTokenCount", "CompletionTokenCount"])
        for r in requests:
            writer.writerow([VIDUR_TRACE_DATE, repr(r.time), r.prompt_tokens, r.output_tokens])


def load_slice(limit: int | None) -> list[RequestArrival]:
    return clip_like_vidur(read_trace(resolve_trace(TRACE), limit=limit).requests, MAX_TOKENS)


def project_cost() -> LinearCostModel:
    """The roofline prior of Llama-2-70B with TP 2 on the A100 (its assumptions were fitted to Vidur's measured
    kernels: costmodel/roofline.py); the project needs no profile for it."""
    return roofline_prior(load_model(MODEL), get_hardware(HARDWARE), TP)


def commit() -> str:
    """The checkout's commit, marked when files differ from it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def simulator_core() -> str:
    """Which core `simulate` ran: the compiled one or the pure-Python loop."""
    compiled = getattr(simulator, "COMPILED", None)
    if compiled is None:
        return "pure Python (this build has no compiled core)"
    return "compiled" if compiled else "pure Python"


# ---- measuring


@dataclass(frozen=True, slots=True)
class Process:
    wall_s: float
    cpu_s: float  # user + system
    peak_rss_mb: float


def run_process(command: Sequence[str], cwd: Path, log: Path) -> Process:
    """Run `command` to its end: its wall time from start to exit, and its CPU time and peak RSS as the kernel
    counted them (wait4: that process alone)."""
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}; its output: {log}")
    return Process(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def vidur_python() -> Path:
    """Vidur 0.0.26's interpreter, in its own virtual environment: made here on first use, reused afterwards."""
    python = VIDUR_VENV / "bin" / "python"
    check = [str(python), "-c", "import importlib.metadata as m; assert m.version('vidur') == '0.0.26'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {VIDUR_VENV} with {', '.join(VIDUR_PACKAGES)} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VIDUR_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *VIDUR_PACKAGES], check=True)
    subprocess.run(check, check=True)
    return python


@dataclass(frozen=True, slots=True)
class VidurRun:
    loop_s: float
    loop_cpu_s: float
    process: Process
    batches: int
    restarts: int
    num_blocks: int
    mean_batch_size: float
    import_s: float
    init_s: float  # its config, predictors (from the cache once warm) and requests


def run_vidur(python: Path, trace: Path, scheduler: str, scratch: Path) -> VidurRun:
    result = scratch / f"vidur-{scheduler}-{trace.stem}.json"
    command = [
        str(python), str(VIDUR_DRIVER),
        "--profiles", str(PROFILES), "--trace", str(trace), "--scheduler", scheduler,
        "--batch-cap", str(BATCH_CAP), "--max-tokens-in-batch", str(MAX_TOKENS), "--chunk-size", str(CHUNK),
        "--max-tokens", str(MAX_TOKENS), "--work", str(VIDUR_WORK), "--result", str(result),
    ]  # fmt: skip
    VIDUR_WORK.mkdir(parents=True, exist_ok=True)
    process = run_process(command, VIDUR_WORK, result.with_suffix(".log"))
    out = json.loads(result.read_text())
    return VidurRun(
        out["loop_s"],
        out["loop_cpu_s"],
        process,
        out["batches"],
        out["restarts"],
        out["num_blocks"],
        out["mean_batch_size"],
        out["import_s"],
        out["config_s"] + out["init_s"],
    )


@dataclass(frozen=True, slots=True)
class ProjectRun:
    loop_s: list[float]
    loop_cpu_s: list[float]
    process: Process
    batches: int
    preemptions: int
    cached_tokens: int  # prompt tokens found in the prefix cache


def run_project_process(n: int, policy: str, num_kv_blocks: int, scratch: Path) -> Process:
    """The whole job in a fresh interpreter: imports, reading the trace, `simulate`, exit."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), policy, str(num_kv_blocks)]
    return run_process(command, REPO, scratch / "project-child.log")


def child(n: int, policy: str, num_kv_blocks: int) -> None:
    result = simulator.simulate(
        load_slice(n), policy, project_cost(), num_kv_blocks=num_kv_blocks, block_size=BLOCK_SIZE
    )
    if len(result.requests) != n or any(r.finish != r.finish for r in result.requests):
        raise SystemExit(f"{policy}: not every request finished")


def time_loop(
    requests: Sequence[RequestArrival], policy: str, cost: LinearCostModel, blocks: int, repeats: int
):
    """`repeats` timed `simulate` calls (wall and CPU seconds) after one untimed warm-up."""
    result = simulator.simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE)
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = simulator.simulate(requests, policy, cost, num_kv_blocks=blocks, block_size=BLOCK_SIZE)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return wall, cpu, result


# ---- the table


@dataclass(slots=True)
class Comparison:
    """Every sample of one row of one slice, over all rounds."""

    n: int
    row: Row
    vidur: list[VidurRun] = dataclasses.field(default_factory=list)
    project: list[ProjectRun] = dataclasses.field(default_factory=list)


def span(values: Sequence[float], digits: int) -> str:
    """`low-high`, or one value when they agree to `digits` decimals."""
    low, high = f"{min(values):,.{digits}f}", f"{max(values):,.{digits}f}"
    return low if low == high else f"{low}-{high}"


def ratio(vidur: Sequence[float], project: Sequence[float]) -> str:
    """Median against median."""
    return f"{statistics.median(vidur) / statistics.median(project):,.0f}x"


def table(comparisons: Sequence[Comparison]) -> list[str]:
    """CPU seconds: on a loaded machine a process's wall time is mostly its wait for a core."""
    lines = [
        "| requests | Vidur | project | batches: Vidur / project | loop CPU s: Vidur | loop CPU s: project "
        "| loop ratio | process CPU s: Vidur | process CPU s: project | process ratio "
        "| peak RSS MB: Vidur / project | memory ratio |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        v_loop = [v.loop_cpu_s for v in c.vidur]
        p_loop = [t for p in c.project for t in p.loop_cpu_s]
        v_proc = [v.process.cpu_s for v in c.vidur]
        p_proc = [p.process.cpu_s for p in c.project]
        v_rss = [v.process.peak_rss_mb for v in c.vidur]
        p_rss = [p.process.peak_rss_mb for p in c.project]
        batches = f"{span([v.batches for v in c.vidur], 0)} / {span([p.batches for p in c.project], 0)}"
        lines.append(
            f"| {c.n:,} | {c.row.vidur_scheduler} | {c.row.label} | {batches} | {span(v_loop, 2)} "
            f"| {span(p_loop, 3)} | {ratio(v_loop, p_loop)} | {span(v_proc, 1)} | {span(p_proc, 2)} "
            f"| {ratio(v_proc, p_proc)} | {span(v_rss, 0)} / {span(p_rss, 0)} | {ratio(v_rss, p_rss)} |"
        )
    return lines


def wall_table(comparisons: Sequence[Comparison]) -> list[str]:
    """The same runs in wall seconds."""
    lines = [
        "| requests | project row | loop wall s: Vidur | loop wall s: project | loop ratio | process wall s: Vidur "
        "| process wall s: project | process ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        v_loop = [v.loop_s for v in c.vidur]
        p_loop = [t for p in c.project for t in p.loop_s]
        v_proc = [v.process.wall_s for v in c.vidur]
        p_proc = [p.process.wall_s for p in c.project]
        lines.append(
            f"| {c.n:,} | {c.row.label} | {span(v_loop, 2)} | {span(p_loop, 3)} | {ratio(v_loop, p_loop)} "
            f"| {span(v_proc, 1)} | {span(p_proc, 2)} | {ratio(v_proc, p_proc)} |"
        )
    return lines


def work_lines(comparisons: Sequence[Comparison]) -> list[str]:
    """What each did in the first round, per slice and Vidur scheduler: Vidur's restarts (its preemptions),
    batch size and set-up; the project's preemptions and prefix-cache hits per row."""
    lines = []
    for n, scheduler in dict.fromkeys((c.n, c.row.vidur_scheduler) for c in comparisons):
        group = [c for c in comparisons if (c.n, c.row.vidur_scheduler) == (n, scheduler)]
        v = group[0].vidur[0]
        import_s = statistics.median(r.import_s for r in group[0].vidur)
        init_s = statistics.median(r.init_s for r in group[0].vidur)
        project = "; ".join(
            f"{c.row.label} {c.project[0].preemptions:,} preemptions, {c.project[0].cached_tokens:,} prompt "
            f"tokens from the prefix cache"
            for c in group
        )
        lines.append(
            f"- {n:,} requests, Vidur {scheduler}: {v.restarts:,} restarts, {v.mean_batch_size:.1f} requests per "
            f"batch on average; import {import_s:.1f} s, set-up (config, predictors from its cache, requests) "
            f"{init_s:.1f} s (medians). The project: {project}."
        )
    return lines


# ---- the run


def measure(args: argparse.Namespace) -> list[str]:
    python = vidur_python()
    cost = project_cost()
    sizes = [int(s) for s in args.sizes.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="replay-speed-"))
    slices = {n: load_slice(n) for n in sizes}
    traces = {}
    for n, requests in slices.items():
        traces[n] = scratch / f"azure-conv-{n}.csv"
        write_vidur_trace(requests, traces[n])
    load_before = os.getloadavg()
    if not (VIDUR_WORK / "predictor-cache" / "predictors").is_dir():
        # Untimed: the first run trains Vidur's predictors (minutes) and caches them for every later run.
        print("training Vidur's predictors (first run)", flush=True)
        run_vidur(python, traces[sizes[0]], "vllm", scratch)
    comparisons = [Comparison(n, row) for n in sizes for row in ROWS]
    num_blocks = None
    for round_ in range(args.rounds):
        for n in sizes:
            for scheduler in ("vllm", "sarathi"):
                vidur = run_vidur(python, traces[n], scheduler, scratch)
                if num_blocks is None:
                    num_blocks = vidur.num_blocks
                blocks = num_blocks + 1  # the project counts vLLM's null block among the KV blocks
                for c in (c for c in comparisons if c.n == n and c.row.vidur_scheduler == scheduler):
                    c.vidur.append(vidur)
                    process = run_project_process(n, c.row.policy, blocks, scratch)
                    wall, cpu, result = time_loop(slices[n], c.row.policy, cost, blocks, args.repeats)
                    preemptions = sum(r.preemptions for r in result.requests)
                    cached = sum(r.num_cached_tokens for r in result.requests)
                    c.project.append(ProjectRun(wall, cpu, process, result.num_steps, preemptions, cached))
                    print(
                        f"round {round_ + 1}: {n:,} {c.row.label}: loop CPU s Vidur {vidur.loop_cpu_s:.2f}, "
                        f"project {statistics.median(cpu):.4f}",
                        flush=True,
                    )
    assert num_blocks is not None
    shutil.rmtree(scratch)  # kept when a run fails: the error names the log in it
    hour_lines = [] if args.skip_hour else whole_hour(num_blocks + 1, cost)
    load_after = os.getloadavg()
    own_blocks = kv_capacity_blocks(load_model(MODEL), get_hardware(HARDWARE), tp=TP, block_size=BLOCK_SIZE)
    return [
        f"Llama-2-70B, TP 2, A100-80GB; Azure conversation 2023 ({TRACE}), first N requests, real arrival times, "
        f"prompts clipped to prompt + output <= {MAX_TOKENS:,}. KV: {num_blocks:,} blocks of {BLOCK_SIZE} tokens "
        f"(Vidur's memory planner; the project is given the same, its own estimate is {own_blocks - 1:,}).",
        "",
        f"Vidur 0.0.26 (PyPI) with its official profiles (benchmarks/data/vidur-profiling/full), predictors warm "
        f"(from its cache), metrics, plots and traces off. The project: `simulate` with the roofline prior of "
        f"Llama-2-70B TP 2 on the A100 (a={cost.a * 1e3:.1f} ms, b={cost.b * 1e6:.0f} us/token), every "
        f"per-request record produced; simulator core: **{simulator_core()}**.",
        "",
        f"{args.rounds} rounds, alternating (per round and slice: Vidur once, then each project row: one fresh "
        f"process and {args.repeats} timed loops in this process after one warm-up). Figures: low-high over all "
        f"samples; ratios: median against median. Vidur's vllm scheduler batches like vLLM V0 (prefills first, "
        f"none chunked). Machine: {os.cpu_count()} cores shared with other jobs, load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end: CPU seconds are the measure, wall "
        f"seconds follow. Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}.",
        "",
        *table(comparisons),
        "",
        *wall_table(comparisons),
        "",
        "What each did (first round); the Azure trace carries no prompt hashes, so with prefix caching on the "
        "project pays the cache's bookkeeping and finds nothing to share (Vidur 0.0.26 has a prefix-caching "
        "option in its config that none of its Python code reads):",
        "",
        *work_lines(comparisons),
        "",
        *hour_lines,
    ]


def whole_hour(blocks: int, cost: LinearCostModel) -> list[str]:
    """The whole Azure hour under 20 candidates, one after another on one core (the earlier figure's setting,
    Llama-2-7B on one A100, and this run's, Llama-2-70B TP 2)."""
    arch, hw = load_model("llama-2-7b"), get_hardware("a100")
    settings: list[tuple[str, Callable[[], list[RequestArrival]], LinearCostModel, int]] = [
        (
            "Llama-2-7B on one A100 (roofline prior, its own KV estimate), the trace unclipped",
            lambda: read_trace(resolve_trace(TRACE)).requests,
            roofline_prior(arch, hw, 1),
            kv_capacity_blocks(arch, hw, block_size=BLOCK_SIZE),
        ),
        ("Llama-2-70B TP 2 as above, clipped as above", lambda: load_slice(None), cost, blocks),
    ]
    lines = []
    for label, requests_of, model, num_blocks in settings:
        requests = requests_of()
        wall, cpu = time.perf_counter(), time.process_time()
        steps = sum(
            simulator.simulate(requests, p, model, num_kv_blocks=num_blocks, block_size=BLOCK_SIZE).num_steps
            for p in CANDIDATES_20
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        lines.append(
            f"- {label}: {len(requests):,} requests, {wall:.2f} s wall, {cpu:.2f} s CPU ({steps:,} simulated steps)."
        )
    return [
        "The whole hour under 20 candidate configurations, one after another in one process (one core; the "
        "target is under 1 s):",
        "",
        *lines,
        "",
        "Candidates: " + ", ".join(CANDIDATES_20),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed project loops per round")
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES), help="requests per slice")
    parser.add_argument(
        "--skip-hour", action="store_true", help="leave out the whole hour under 20 candidates"
    )
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS-replay.md")
    parser.add_argument("--child", nargs=3, metavar=("N", "POLICY", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], int(args.child[2]))
        return
    lines = measure(args)
    print("\n".join(lines))
    if args.write:
        write_results(HERE / "RESULTS-replay.md", lines)


def write_results(path: Path, lines: Sequence[str]) -> None:
    path.write_text(
        "# Replay speed side by side with Vidur\n\nReproduce: `python benchmarks/replay_speed.py --write` "
        "(about 10-15 minutes on 2 loaded cores; the first run also installs Vidur, a few minutes, and trains "
        "its predictors, about 1.5 minutes)\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
