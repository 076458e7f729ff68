"""The tests' one check that a compiled module is built and current before it is held to its plain-Python oracle."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import pytest


def current_build(
    build: ModuleType | None, module: str, what: str, stale_sources: Callable[[ModuleType], list[str]]
) -> ModuleType:
    """`build` (the compiled `module`, "the compiled `what`"), built from its current sources. Skips only where
    the build was skipped on purpose (VLLM_SHADOW_SKIP_COMPILE), fails anywhere else."""
    if build is None:
        if os.environ.get("VLLM_SHADOW_SKIP_COMPILE", "") not in ("", "0"):
            pytest.skip(f"compiled {what} not built (VLLM_SHADOW_SKIP_COMPILE is set)")
        pytest.fail(
            f"{module} is not built: `pip install -e .` compiles it (setup.py); set "
            "VLLM_SHADOW_SKIP_COMPILE=1 only on a machine that cannot compile it"
        )
    stale = stale_sources(build)
    assert not stale, f"the compiled {what} is older than {', '.join(stale)}: rebuild it (`pip install -e .`)"
    return build
