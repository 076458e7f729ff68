"""Regenerate `shadow_events_pb2.py` (+ `.pyi`) from `shadow_events.proto`, or check the checked-in copy.

The generated module is checked in so that installing the project needs protobuf only, not grpcio-tools
(protoc).
    python -m adapters.proto.generate          # rewrite the generated files
    python -m adapters.proto.generate --check  # exit 1 if they differ from what protoc makes now
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "shadow_events.proto"
OUTPUTS = ("shadow_events_pb2.py", "shadow_events_pb2.pyi")
LINT_MARKER = "# ruff: noqa\n# fmt: off\n"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time only: imported here so that importing this module stays light

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", str(HERE / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {HERE / PROTO}")
    for name in OUTPUTS:
        # protoc's style is not ours; the marker keeps the linter off machine-written code.
        path = out_dir / name
        path.write_text(LINT_MARKER + path.read_text())


def stale_outputs() -> list[str]:
    """Names of generated files whose checked-in text differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name
            for name in OUTPUTS
            if not (HERE / name).exists() or (HERE / name).read_bytes() != (Path(tmp) / name).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the generated files are fresh")
    if parser.parse_args(argv).check:
        stale = stale_outputs()
        if stale:
            print(f"stale generated files: {', '.join(stale)}; run python -m adapters.proto.generate")
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
