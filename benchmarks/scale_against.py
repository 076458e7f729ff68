"""Engines per core of this tree and of a git revision, alternating in one run.

`shadow_scale.py`'s figure is CPU time, and on a shared machine a core's speed changes with its neighbours' load
(the same code measured 639-903 engines per core one morning and about 1,250 that afternoon): a figure compares
with another only when both ran at the same time. This runs `shadow_scale.py --skip-end-to-end` (this tree's
benchmark, so both sides are measured the same way) alternately on REV and on this tree, and reports each run, the
medians and their ratios.

REV is exported with `git archive`, installed by pip into a folder of its own (`pip install --target`: built as
its pyproject.toml says, compiled modules included, no dependencies), and that folder put first on the import
path. REV must have the `vllm_shadow` package and what shadow_scale.py imports from it.

    python benchmarks/scale_against.py ab8edf3                 # 3 alternations of 3 rounds each
    python benchmarks/scale_against.py ab8edf3 --runs 5 --json against.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "benchmarks" / "shadow_scale.py"


def export_revision(revision: str, into: Path) -> Path:
    """REV installed (built, its compiled modules included) into `into`/path; returns that folder, to put first
    on the import path."""
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    print(f"building and installing {revision} into {into / 'path'} ...", flush=True)
    # pip builds REV as its pyproject.toml says (Cython fetched into an isolated build environment, so this
    # interpreter needs none), and --target lays out the vllm_shadow package as an install would.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SHADOW_SKIP_COMPILE"}
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(into / "path"),
            str(tree),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if build.returncode:
        sys.exit(f"building {revision} failed:\n{build.stderr[-4000:]}")
    return into / "path"


def scale_run(python_path: str | None, rounds: int, out: Path) -> dict:
    """One shadow_scale run (from a neutral folder, so that the import path decides which code runs)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if python_path:
        env["PYTHONPATH"] = python_path
    command = [sys.executable, str(SCALE), "--skip-end-to-end", "--rounds", str(rounds), "--json", str(out)]
    subprocess.run(command, cwd=out.parent, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    plain = [name for name, compiled in result["compiled"].items() if compiled is False]
    if plain:
        sys.exit(f"{python_path or 'this tree'} ran {', '.join(plain)} as plain Python: rebuild it first")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("revision", help="the git revision to compare with (e.g. a commit before a change)")
    parser.add_argument("--runs", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="shadow_scale's --rounds per run (default 3)")
    parser.add_argument("--json", help="also write every run's figures here")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
    sides = {args.revision: "", "this tree": None}
    figures: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="scale-against-") as scratch:
        sides[args.revision] = str(export_revision(args.revision, Path(scratch)))
        for run in range(args.runs):
            for side, python_path in sides.items():
                result = scale_run(python_path, args.rounds, Path(scratch) / "scale.json")
                row = {
                    "ingest_ms_per_engine_second": result["ingest_cpu_seconds"]
                    / result["traffic_seconds"]
                    * 1e3,
                    "evaluation_ms_per_window": result["evaluation_cpu_seconds_per_window"] * 1e3,
                    "engines_per_core": result["engines_per_core_at_20_candidates"],
                    "steps_matched": result["self_replay_steps_matched"],
                }
                figures[side].append(row)
                print(
                    f"run {run + 1} {side:>12}: ingest {row['ingest_ms_per_engine_second']:.3f} ms per engine-second, "
                    f"evaluation {row['evaluation_ms_per_window']:.2f} ms per window, "
                    f"{row['engines_per_core']:.0f} engines per core",
                    flush=True,
                )
    medians = {
        side: {key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "steps_matched"}
        for side, rows in figures.items()
    }
    old, new = medians[args.revision], medians["this tree"]
    print(
        f"medians: {args.revision} {old['engines_per_core']:.0f} -> this tree {new['engines_per_core']:.0f} engines "
        f"per core ({new['engines_per_core'] / old['engines_per_core']:.2f}x); ingest "
        f"{old['ingest_ms_per_engine_second'] / new['ingest_ms_per_engine_second']:.2f}x, evaluation "
        f"{old['evaluation_ms_per_window'] / new['evaluation_ms_per_window']:.2f}x less CPU"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": figures, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
