"""Hold-out error of measured cost profiles, per kind of batch, against the roofline prior.

For a profile file written by `shadow profile` (the shipped CPU profile of the tiny model by default), or for a
fresh measurement (`--measure`), prints per batch kind (prefill-heavy, decode-heavy, mixed):
  - the linear model fitted to the measurements (time = a + b*T + c*K + d*P + e*R, the terms selected by BIC):
    error on the batches it was fitted to, and 5-fold hold-out error (each batch predicted by a fit that did
    not see it);
  - INFERMAX's form, the same fit without the per-request term e*R, hold-out: what that term buys;
  - the roofline prior of the profile's hardware entry, both as the linear model the shadow uses before
    calibration and as the raw roofline it is fitted to (so its linearisation and its assumptions can be told
    apart), with the bias (mean signed error; positive = predicts too slow);
  - the run-to-run noise: the median spread (max - min) / median of each batch's timed repetitions.
`--layer-check` measures the grid again with 1 and 2 decoder layers built and scaled to the model's count, and
compares with the measurement of all of them: the error the "few layers, scaled" shortcut adds, beside the
difference between two measurements of all layers (the noise floor).

    python benchmarks/profile_holdout.py                                  # the shipped tiny-llama CPU profile
    python benchmarks/profile_holdout.py --profile FILE.json              # any profile from `shadow profile`
    python benchmarks/profile_holdout.py --measure --model tiny-llama --seed 1
    python benchmarks/profile_holdout.py --layer-check --model tiny-llama
    python benchmarks/profile_holdout.py --refit "why"                    # refit the profile file in place

`--refit` rewrites the profile file with the current cost model fitted to the measurements the file carries,
validated against the roofline prior of its hardware entry, without measuring again; its provenance says so.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from vllm_shadow.costmodel.architecture import ModelArchitecture, load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.linear import fit_linear
from vllm_shadow.costmodel.profiling import (
    BATCH_KINDS,
    Measurement,
    ProfileSettings,
    feature_matrix,
    holdout_errors,
    load_measurements,
    refit_profile_run,
    run_profile,
    save_profile_run,
)
from vllm_shadow.costmodel.roofline import roofline_batch_time, roofline_prior

SHIPPED = Path(str(resources.files("vllm_shadow.costmodel") / "data" / "profiles" / "tiny-llama-cpu.json"))


def _rows(kinds: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [(k, kinds == k) for k in BATCH_KINDS if k in kinds] + [("all", np.ones(len(kinds), dtype=bool))]


def _pct(values: np.ndarray, signed: bool = False) -> str:
    return f"{values.mean() * 100:+.1f}%" if signed else f"{values.mean() * 100:.1f}%"


def report_errors(measurements: Sequence[Measurement], arch: ModelArchitecture, hardware: str) -> None:
    hw = get_hardware(hardware)
    features = feature_matrix([m.batch for m in measurements])
    times = np.array([m.seconds for m in measurements])
    kinds = np.array([m.batch.kind for m in measurements])
    fitted = fit_linear(features, times)
    fit = np.abs(fitted.predict(features) - times) / times
    held_out = holdout_errors(features, times)
    without_e = holdout_errors(features, times, with_request_term=False)
    prior = (roofline_prior(arch, hw).predict(features) - times) / times
    raw = np.array(
        [roofline_batch_time(arch, hw, m.batch.new_tokens, m.batch.context_tokens) for m in measurements]
    )
    raw = (raw - times) / times
    spread = np.array([(max(m.repeats_s) - min(m.repeats_s)) / m.seconds for m in measurements])
    print(f"\n{arch.name} on {hw.name}: {len(times)} batches; fitted {fitted}\n")
    print(
        "| batch kind | batches | linear fit | linear hold-out | without e·R, hold-out | "
        f"prior ({hw.name}) | prior bias | raw roofline | raw roofline bias | repeat spread (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, chosen in _rows(kinds):
        print(
            f"| {kind} | {chosen.sum()} | {_pct(fit[chosen])} | {_pct(held_out[chosen])} | "
            f"{_pct(without_e[chosen])} | {_pct(np.abs(prior[chosen]))} | {_pct(prior[chosen], True)} | "
            f"{_pct(np.abs(raw[chosen]))} | {_pct(raw[chosen], True)} | {np.median(spread[chosen]) * 100:.1f}% |"
        )


def layer_check(arch: ModelArchitecture, settings: ProfileSettings) -> None:
    """Measure the grid with all layers built, then with 1 and 2 built and scaled, then with all again: the
    second full measurement's difference from the first is the noise floor the scaled ones are judged by."""
    full = run_profile(arch, replace(settings, layers=arch.num_layers))
    reference = np.array([m.seconds for m in full.measurements])
    kinds = np.array([m.batch.kind for m in full.measurements])
    print(f"\nLayer scaling, {arch.name}: k built layers scaled to {arch.num_layers}, against all built\n")
    print("| layers built | batch kind | mean abs difference | bias | worst |")
    print("|---|---|---:|---:|---:|")
    for layers in (1, 2, arch.num_layers):
        if layers > arch.num_layers or (layers == arch.num_layers and layers < 3):
            continue
        label = f"{layers}, scaled" if layers < arch.num_layers else f"{layers} again (noise floor)"
        scaled = run_profile(arch, replace(settings, layers=layers))
        error = (np.array([m.seconds for m in scaled.measurements]) - reference) / reference
        for kind, chosen in _rows(kinds):
            print(
                f"| {label} | {kind} | {_pct(np.abs(error[chosen]))} | {_pct(error[chosen], True)} | "
                f"{np.abs(error[chosen]).max() * 100:.0f}% |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", type=Path, default=SHIPPED, help="a profile file written by shadow profile"
    )
    parser.add_argument("--measure", action="store_true", help="measure afresh instead of reading --profile")
    parser.add_argument("--layer-check", action="store_true", help="compare 1 and 2 scaled layers with all")
    parser.add_argument("--model", default="tiny-llama", help="with --measure or --layer-check")
    parser.add_argument("--hardware", default="cpu", help="hardware entry of the prior (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="grid seed, with --measure or --layer-check")
    parser.add_argument(
        "--refit", metavar="NOTE", help="refit --profile in place to its measurements; NOTE says why"
    )
    args = parser.parse_args()
    settings = ProfileSettings(seed=args.seed)
    if args.layer_check:
        layer_check(load_model(args.model), settings)
        return
    if args.measure:
        arch = load_model(args.model)
        run = run_profile(arch, settings)
        report_errors(run.measurements, arch, args.hardware)
        return
    data = json.loads(args.profile.read_text())
    if args.refit:
        hardware = get_hardware(data["hardware"])
        prior = roofline_prior(load_model(data["model"]), hardware)
        run = refit_profile_run(args.profile, prior=prior, prior_hardware=hardware.name, note=args.refit)
        save_profile_run(run, args.profile)
        data = json.loads(args.profile.read_text())
    print(f"{args.profile}: {data['provenance']}")
    report_errors(load_measurements(args.profile), load_model(data["model"]), data["hardware"])


if __name__ == "__main__":
    main()
