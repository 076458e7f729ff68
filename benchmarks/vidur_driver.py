"""Run PyPI vidur 0.0.26 once, offline, and time its phases. Runs INSIDE Vidur's own virtual environment
(benchmarks/replay_speed.py creates it and calls this file); it imports nothing of the project.

Three changes to Vidur:
  * its profiles come from local files (the `--profiles` directory, laid out as Vidur's `data/profiling`)
    instead of a Hugging Face download, and there is no attempt to fetch precomputed predictions;
  * a restarted (preempted) request's per-stage counters are reset: 0.0.26's `Request.restart` resets the
    request's own counters but not `_num_stage_processed_tokens` / `_is_prefill_stage_complete`, so the first
    preemption trips `assert self._num_stage_processed_tokens <= self.total_tokens`;
  * a counter on `BatchEndEvent.handle_event` gives the batch count (one more Python call per batch, timed with
    the loop).

    python vidur_driver.py --profiles DIR --trace TRACE.csv --scheduler vllm|sarathi --work DIR --result OUT.json

The result is one JSON object: requests, batches, restarts, KV blocks and the seconds of each phase (import,
config, init = predictors and requests, loop = Vidur's event loop alone, output, python = the whole run after the
interpreter started); the loop also in CPU seconds.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Vidur itself is imported in main(), timed: this module's names stay importable without it (the tests read them).

# Vidur's own names for the profile files of Llama-2-70B with TP 2 on A100s paired by NVLink.
MODEL = "meta-llama/Llama-2-70b-hf"
DEVICE, NETWORK_DEVICE = "a100", "a100_pairwise_nvlink"
MLP_FILE = f"a100/{MODEL}/mlp.csv"
ATTENTION_FILE = "a100-legacy-llama2-70b/attention.csv"  # the only official attention profile (TP 2)
NETWORK_DIR = f"network/{NETWORK_DEVICE}"


def profile_files(root: Path) -> tuple[Path, Path, Path, Path]:
    """The files Vidur's predictor reads, in the order of its `_get_input_files`: mlp, attention, all-reduce,
    send-recv."""
    network = root / NETWORK_DIR
    return root / MLP_FILE, root / ATTENTION_FILE, network / "all_reduce.csv", network / "send_recv.csv"


def serve_profiles_from(root: Path) -> None:
    """Vidur 0.0.26 downloads profiles from Hugging Face at run time; point it at local copies instead."""
    from vidur.execution_time_predictor import sklearn_execution_time_predictor as sklearn_predictor

    def input_files(self) -> tuple[str, ...]:
        return tuple(str(path) for path in profile_files(root))

    def no_hub_predictions(self):
        raise RuntimeError("offline: predictions are trained from the local profiles")

    sklearn_predictor.SklearnExecutionTimePredictor._get_input_files = input_files
    sklearn_predictor.SklearnExecutionTimePredictor._load_predictions_from_hf = no_hub_predictions


def fix_restart(counts: dict[str, int]) -> None:
    """Reset the per-stage counters that 0.0.26's `Request.restart` leaves behind (see the module doc)."""
    from vidur.entities import request as vidur_request

    restart = vidur_request.Request.restart

    def restart_with_stage_reset(self) -> None:
        restart(self)
        self._num_stage_processed_tokens = 0
        self._is_prefill_stage_complete = False
        counts["restarts"] += 1

    vidur_request.Request.restart = restart_with_stage_reset


def count_batches(counts: dict[str, int]) -> None:
    from vidur.events import batch_end_event

    handle = batch_end_event.BatchEndEvent.handle_event

    def counted(self, *args, **kwargs):
        counts["batches"] += 1
        counts["batch_requests"] += len(self._batch.requests)
        return handle(self, *args, **kwargs)

    batch_end_event.BatchEndEvent.handle_event = counted


def vidur_arguments(args: argparse.Namespace, output: Path) -> list[str]:
    """Vidur's own command line for one replica of Llama-2-70B, TP 2, A100, replaying `args.trace`."""
    if args.scheduler == "vllm":
        scheduler = [
            "--replica_scheduler_config_type", "vllm",
            "--vllm_scheduler_config_batch_size_cap", str(args.batch_cap),
            "--vllm_scheduler_config_max_tokens_in_batch", str(args.max_tokens_in_batch),
        ]  # fmt: skip
    else:
        scheduler = [
            "--replica_scheduler_config_type", "sarathi",
            "--sarathi_scheduler_config_batch_size_cap", str(args.batch_cap),
            "--sarathi_scheduler_config_chunk_size", str(args.chunk_size),
        ]  # fmt: skip
    # A one-point grid for the random forests: the first (cold) run trains in about 1.5 minutes instead of
    # about 20. The loop only looks predictions up in the table built at init, so its speed does not depend
    # on the grid.
    predictor = "--random_forrest_execution_time_predictor_config_"
    return [
        "--replica_config_device", DEVICE,
        "--replica_config_network_device", NETWORK_DEVICE,
        "--replica_config_model_name", MODEL,
        "--replica_config_tensor_parallel_size", "2",
        "--replica_config_num_pipeline_stages", "1",
        "--cluster_config_num_replicas", "1",
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", str(args.trace),
        "--trace_request_generator_config_max_tokens", str(args.max_tokens),
        "--trace_request_generator_config_prefill_scale_factor", "1",
        "--trace_request_generator_config_decode_scale_factor", "1",
        "--trace_request_generator_config_time_scale_factor", "1",
        predictor + "cache_dir", str(args.work / "predictor-cache"),
        predictor + "prediction_max_tokens_per_request", str(args.max_tokens),
        predictor + "num_estimators", "250",
        predictor + "max_depth", "16",
        predictor + "min_samples_split", "2",
        "--no-metrics_config_store_plots",
        "--no-metrics_config_enable_chrome_trace",
        "--no-metrics_config_write_metrics",
        "--metrics_config_output_dir", str(output),
        *scheduler,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=Path, required=True, help="Vidur's data/profiling layout")
    parser.add_argument("--trace", type=Path, required=True, help="Date,Time,PromptTokenCount,...")
    parser.add_argument("--scheduler", choices=("vllm", "sarathi"), required=True)
    parser.add_argument("--batch-cap", type=int, default=128)
    parser.add_argument("--max-tokens-in-batch", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096, help="per request (Vidur clips prompts)")
    parser.add_argument("--work", type=Path, required=True, help="the predictor cache's directory")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    from vidur.config import SimulationConfig
    from vidur.simulator import Simulator
    from vidur.utils.random import set_seeds

    imported = time.perf_counter()
    counts = {"batches": 0, "batch_requests": 0, "restarts": 0}
    serve_profiles_from(args.profiles.resolve())
    fix_restart(counts)
    count_batches(counts)
    marks: dict[str, float] = {}
    write_output = Simulator._write_output

    def timed_write_output(self) -> None:
        marks["loop_end"], marks["loop_end_cpu"] = time.perf_counter(), time.process_time()
        write_output(self)

    Simulator._write_output = timed_write_output

    output = tempfile.TemporaryDirectory(prefix="vidur-output-")  # Vidur writes its config there
    sys.argv = [sys.argv[0], *vidur_arguments(args, Path(output.name))]
    config = SimulationConfig.create_from_cli_args()
    set_seeds(config.seed)
    configured = time.perf_counter()
    simulator = Simulator(config)
    initialised, initialised_cpu = time.perf_counter(), time.process_time()
    requests = len(simulator._event_queue)
    simulator.run()
    finished = time.perf_counter()
    output.cleanup()
    (replica,) = simulator.scheduler._replica_schedulers.values()  # keyed by ReplicaId objects
    result = {
        "requests": requests,
        "batches": counts["batches"],
        "mean_batch_size": counts["batch_requests"] / max(1, counts["batches"]),
        "restarts": counts["restarts"],
        "num_blocks": int(replica._cache_config.num_blocks),
        "simulated_seconds": simulator._time,
        "import_s": imported - STARTED,
        "config_s": configured - imported,
        "init_s": initialised - configured,
        "loop_s": marks["loop_end"] - initialised,
        "loop_cpu_s": marks["loop_end_cpu"] - initialised_cpu,
        "output_s": finished - marks["loop_end"],
        "python_s": finished - STARTED,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
