"""Load a few of the project's modules as a git revision had them, beside this tree's: the benchmarks'
`--against REV` / `--path-against REV` runs alternate old and new code in one process, so that both sides see the
same machine load."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_revision_modules(
    revision: str, files: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]
) -> dict[str, ModuleType]:
    """Each (name, path, imports) of `files` as `revision` had `path`, loaded as the module `_revision_<name>`,
    its `from <ours> import` lines of `imports` redirected to `from <theirs> import` (an earlier file of the
    list, under its private name); everything else it imports is this tree's."""
    modules = {}
    for name, path, imports in files:
        source = subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        for ours, theirs in imports:
            source = source.replace(f"from {ours} import", f"from {theirs} import")
        module = ModuleType(f"_revision_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
        modules[name] = module
    return modules
