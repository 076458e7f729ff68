"""Regenerate `shadow_events_pb2.py` (+ `.pyi`) from `shadow_events.proto`, or check the checked-in copy.

The generated module is checked in so that installing the project needs protobuf only, not grpcio-tools
(protoc).
    python -m vllm_shadow.adapters.proto.generate          # rewrite the generated files
    python -m vllm_shadow.adapters.proto.generate --check  # exit 1 if they no longer match the .proto
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


def is_up_to_date() -> bool:
    """Whether the checked-in module describes exactly what `shadow_events.proto` says now.

    Compared as descriptors, not as text: protoc versions stamp their own version into the generated file,
    and a check that failed on every new grpcio-tools would say nothing about the schema.
    """
    from google.protobuf import descriptor_pb2

    from vllm_shadow.adapters.proto import shadow_events_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "schema.bin"
        from grpc_tools import protoc

        if protoc.main(["protoc", f"-I{HERE}", f"--descriptor_set_out={out}", str(HERE / PROTO)]) != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO}")
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(shadow_events_pb2.DESCRIPTOR.serialized_pb)
    # protoc fills in json_name for a descriptor set but leaves it out of the generated module's copy.
    pending = list(fresh.message_type)
    while pending:
        message = pending.pop()
        for f in message.field:
            f.ClearField("json_name")
        pending.extend(message.nested_type)
    return fresh == checked_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the generated files are fresh")
    if parser.parse_args(argv).check:
        if not is_up_to_date():
            print(f"{OUTPUTS[0]} does not match {PROTO}; run python -m vllm_shadow.adapters.proto.generate")
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
