"""Check the roofline prior against real GPU kernel timings measured by Microsoft's Vidur.

Vidur (Agrawal et al., "Vidur: A Large-Scale Simulation Framework for LLM Inference", MLSys 2024, MIT
licence) profiled every operator of a transformer layer on A100 and H100 GPUs. A subset of its data ships in
benchmarks/data/vidur-profiling/ with the licence. This script compares, per operator group and per step:
  1. layer matmuls and small ops (norms, rotary, activation, add) for Llama-2-7B, Llama-3-8B and Llama-2-70B
     at TP 1/2/4/8 on the A100, and Llama-2-7B and Llama-2-70B on the H100, over 1-4096 tokens;
  2. FlashAttention prefill and decode for Llama-2-70B at TP 2 on the A100;
  3. the NCCL all-reduce of two NVLink-paired GPUs (A100 and H100);
  4. whole steps of Llama-2-70B at TP 2 on the A100, built from the measured operators (every layer's
     matmuls, small ops, attention and two all-reduces), against the roofline and the fitted linear prior.

    python benchmarks/vidur_prior_check.py                                           # the tables
    python benchmarks/vidur_prior_check.py --extract-from ../shared/vidur-profiling  # rebuild the subset

Errors are absolute percentage errors of the prediction against the measured median: MAPE (mean), P50, P90
and the bias (mean signed error; positive = the model predicts too slow).
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_shadow.costmodel.architecture import ModelArchitecture, load_model
from vllm_shadow.costmodel.hardware import Hardware, get_hardware
from vllm_shadow.costmodel.roofline import allreduce_seconds, roofline_prior, roofline_step

DATA = Path(__file__).parent / "data" / "vidur-profiling"
MATMUL_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
SMALL_OPS = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")
MLP_FILES = {  # (gpu, Vidur model directory) -> our bundled model
    ("a100", "meta-llama/Llama-2-7b-hf"): "llama-2-7b",
    ("a100", "meta-llama/Meta-Llama-3-8B"): "llama-3-8b",
    ("a100", "meta-llama/Llama-2-70b-hf"): "llama-2-70b",
    ("h100", "meta-llama/Llama-2-7b-hf"): "llama-2-7b",
    ("h100", "meta-llama/Llama-2-70b-hf"): "llama-2-70b",
}
ATTENTION_FILE = "a100-legacy-llama2-70b/attention.csv"
ALLREDUCE_FILES = {
    "a100": "network/a100_pairwise_nvlink/all_reduce.csv",
    "h100": "network/h100_pairwise_nvlink/all_reduce.csv",
}

# The subset: token counts on a log-ish grid, attention shapes on a grid, all-reduce sizes on a log grid.
SUBSET_TOKENS = {1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096}
SUBSET_DECODE_BATCH = {1, 2, 4, 8, 16, 32, 64, 128}
SUBSET_KV = {0, 64, 256, 512, 1024, 2048, 3072, 4032}
SUBSET_CHUNKS = {64, 128, 256, 512, 1024, 2048, 3072, 4096}


@dataclass(frozen=True, slots=True)
class Comparison:
    group: str
    predicted: float
    measured: float


# ---- the comparisons


def compare_layers(arch_cache: dict[str, ModelArchitecture]) -> list[Comparison]:
    rows = []
    for (gpu, vidur_model), name in MLP_FILES.items():
        arch, hw = arch_cache[name], get_hardware(gpu)
        for row in _read(DATA / gpu / vidur_model / "mlp.csv"):
            tokens, tp = int(row["num_tokens"]), int(row["num_tensor_parallel_workers"])
            step = roofline_step(arch, hw, [tokens], [0], tp=tp)
            label = f"{gpu} {name} tp{tp}"
            rows.append(
                Comparison(f"matmuls  {label}", step.matmuls / arch.num_layers, _seconds(row, MATMUL_OPS))
            )
            rows.append(
                Comparison(f"small    {label}", step.elementwise / arch.num_layers, _seconds(row, SMALL_OPS))
            )
    return rows


def compare_attention(arch: ModelArchitecture) -> list[Comparison]:
    hw, tp = get_hardware("a100"), 2
    rows = []
    for row in _read(DATA / ATTENTION_FILE):
        batch, kv = int(row["batch_size"]), int(row["kv_cache_size"])
        if row["is_prefill"] == "True":
            chunk = int(row["prefill_chunk_size"])
            predicted = _attention_per_layer(arch, hw, [chunk] * batch, [kv] * batch, tp)
            group = "prefill chunk " + ("<= 512" if chunk <= 512 else "> 512")
            rows.append(Comparison(group, predicted, _seconds(row, ("attn_prefill",))))
        else:
            predicted = _attention_per_layer(arch, hw, [1] * batch, [kv] * batch, tp)
            group = "decode batch " + ("<= 16" if batch <= 16 else "> 16")
            rows.append(Comparison(group, predicted, _seconds(row, ("attn_decode",))))
    return rows


def compare_allreduce() -> list[Comparison]:
    rows = []
    for gpu, path in ALLREDUCE_FILES.items():
        hw = get_hardware(gpu)
        for size, seconds in _allreduce_table(path):
            band = "< 1 MB" if size < 2**20 else ">= 1 MB"
            rows.append(Comparison(f"{gpu} 2 GPUs {band}", allreduce_seconds(hw, size, 2), seconds))
    return rows


@dataclass(frozen=True, slots=True)
class StepComparison:
    label: str
    measured: float  # the measured operators summed over the layers
    measured_allreduce: float  # the part of `measured` spent in all-reduces
    roofline: float  # the roofline without its LM head and fixed overhead, which Vidur's data lack
    roofline_allreduce: float
    prior: float  # the linear prior, which includes the LM head and overhead
    lm_head_and_overhead: float  # the roofline's LM head and overhead, added to `measured` for the prior


def compare_steps(arch: ModelArchitecture) -> list[StepComparison]:
    """Whole Llama-2-70B TP 2 steps on the A100 built from measured operators: every layer's matmuls, small
    ops, attention and two all-reduces (interpolated between measured message sizes)."""
    hw, tp = get_hardware("a100"), 2
    layer_rows = _read(DATA / "a100/meta-llama/Llama-2-70b-hf/mlp.csv")
    layers = {int(r["num_tokens"]): r for r in layer_rows if int(r["num_tensor_parallel_workers"]) == tp}
    attention = {_attention_key(r): r for r in _read(DATA / ATTENTION_FILE)}
    sizes, times = zip(*_allreduce_table(ALLREDUCE_FILES["a100"]), strict=True)
    prior = roofline_prior(arch, hw, tp)
    shapes = [(False, batch, 1, kv) for batch in (1, 8, 32, 128) for kv in (512, 2048)]
    shapes += [(True, 1, chunk, kv) for chunk in (256, 1024, 2048) for kv in (0, 1024)]
    rows = []
    for is_prefill, batch, chunk, kv in shapes:
        tokens = batch * chunk
        kernel = "attn_prefill" if is_prefill else "attn_decode"
        attention_s = _seconds(attention[(is_prefill, batch, chunk if is_prefill else 0, kv)], (kernel,))
        allreduce_s = 2 * float(np.interp(tokens * arch.hidden_size * arch.dtype_bytes, sizes, times))
        layer_s = _seconds(layers[tokens], MATMUL_OPS + SMALL_OPS)
        new, ctx = [chunk] * batch, [kv] * batch
        step = roofline_step(arch, hw, new, ctx, tp=tp)
        rows.append(
            StepComparison(
                label=f"prefill {chunk} on {kv}" if is_prefill else f"decode {batch} x {kv}",
                measured=arch.num_layers * (layer_s + attention_s + allreduce_s),
                measured_allreduce=arch.num_layers * allreduce_s,
                roofline=step.total - step.lm_head - step.overhead,
                roofline_allreduce=step.allreduce,
                prior=prior.batch_time(new, ctx),
                lm_head_and_overhead=step.lm_head + step.overhead,
            )
        )
    return rows


# ---- helpers


def _attention_per_layer(
    arch: ModelArchitecture, hw: Hardware, new: list[int], ctx: list[int], tp: int
) -> float:
    return roofline_step(arch, hw, new, ctx, tp=tp).attention / arch.num_layers


def _allreduce_table(path: str) -> list[tuple[int, float]]:
    rows = [r for r in _read(DATA / path) if r["num_workers"] == "2"]
    return sorted((int(r["size"]), _seconds(r, ("all_reduce",))) for r in rows)


def _attention_key(row: dict[str, str]) -> tuple[bool, int, int, int]:
    shape = (int(row["batch_size"]), int(row["prefill_chunk_size"]), int(row["kv_cache_size"]))
    return (row["is_prefill"] == "True", *shape)


def _seconds(row: dict[str, str], ops: Iterable[str]) -> float:
    return sum(float(row[f"time_stats.{op}.median"]) for op in ops) / 1e3


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _report(title: str, rows: list[Comparison]) -> None:
    groups: dict[str, list[Comparison]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    print(f"\n{title}")
    print(f"  {'group':<44} {'n':>4} {'MAPE':>7} {'P50':>7} {'P90':>7} {'bias':>7}")
    for group, members in groups.items():
        signed = np.array([(m.predicted - m.measured) / m.measured for m in members])
        errors = np.abs(signed)
        print(
            f"  {group:<44} {len(members):>4} {errors.mean():>7.1%} {np.median(errors):>7.1%} "
            f"{np.percentile(errors, 90):>7.1%} {signed.mean():>+7.1%}"
        )


def _report_steps(rows: list[StepComparison]) -> None:
    print("\nWhole steps, Llama-2-70B TP 2 on A100, in ms: measured operators vs roofline vs linear prior")
    print(
        "  (all-reduce: Vidur measured NCCL; the roofline assumes vLLM's own all-reduce for small messages)"
    )
    columns = ("measured", "(all-red.)", "roofline", "(all-red.)", "error", "prior", "error")
    print(f"  {'step':<22}" + "".join(f"{c:>11}" for c in columns))
    roofline_errors, prior_errors = [], []
    for r in rows:
        roofline_errors.append((r.roofline - r.measured) / r.measured)
        with_extras = r.measured + r.lm_head_and_overhead
        prior_errors.append((r.prior - with_extras) / with_extras)
        milliseconds = (r.measured, r.measured_allreduce, r.roofline, r.roofline_allreduce)
        print(
            f"  {r.label:<22}"
            + "".join(f"{v * 1e3:>11.2f}" for v in milliseconds)
            + f"{roofline_errors[-1]:>+11.1%}{r.prior * 1e3:>11.2f}{prior_errors[-1]:>+11.1%}"
        )
    roofline_mape, prior_mape = np.mean(np.abs(roofline_errors)), np.mean(np.abs(prior_errors))
    print(f"  MAPE: roofline {roofline_mape:.1%}, linear prior {prior_mape:.1%}")


# ---- rebuilding the subset


def extract(source: Path) -> None:
    """Copy the rows and median columns this check reads from Vidur's data/profiling (as laid out in
    ../shared/vidur-profiling) into DATA, with the licence. Rows are kept whole except for the min, max,
    mean and std columns, which this check does not read."""
    for gpu, vidur_model in MLP_FILES:
        mlp = Path(gpu) / vidur_model / "mlp.csv"
        _copy_rows(source / mlp, DATA / mlp, lambda r: int(r["num_tokens"]) in SUBSET_TOKENS)

    def attention_kept(r: dict[str, str]) -> bool:
        kv = int(r["kv_cache_size"])
        if r["is_prefill"] == "True":
            return int(r["prefill_chunk_size"]) in SUBSET_CHUNKS and kv in SUBSET_KV
        return int(r["batch_size"]) in SUBSET_DECODE_BATCH and kv in SUBSET_KV

    _copy_rows(source / ATTENTION_FILE, DATA / ATTENTION_FILE, attention_kept)
    for path in ALLREDUCE_FILES.values():
        sizes = sorted({int(r["size"]) for r in _read(source / path)})
        kept = {sizes[i] for i in np.unique(np.geomspace(1, len(sizes), 40).astype(int) - 1)}
        _copy_rows(
            source / path,
            DATA / path,
            lambda r, kept=kept: r["num_workers"] == "2" and int(r["size"]) in kept,
        )
    shutil.copy(source / "LICENSE", DATA / "LICENSE")


def _copy_rows(source: Path, target: Path, keep: Callable[[dict[str, str]], bool]) -> None:
    rows = [r for r in _read(source) if keep(r)]
    columns = [c for c in rows[0] if not c.startswith("time_stats.") or c.endswith(".median")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extract-from", type=Path, help="Vidur's data/profiling directory to subset")
    args = parser.parse_args()
    if args.extract_from:
        extract(args.extract_from)
        return
    models = {name: load_model(name) for name in set(MLP_FILES.values())}
    _report("Per-layer operators: roofline vs Vidur (one layer)", compare_layers(models))
    _report(
        "Attention, Llama-2-70B TP 2 on A100 (FlashAttention, one layer)",
        compare_attention(models["llama-2-70b"]),
    )
    _report("All-reduce, 2 NVLink-paired GPUs", compare_allreduce())
    _report_steps(compare_steps(models["llama-2-70b"]))


if __name__ == "__main__":
    main()
