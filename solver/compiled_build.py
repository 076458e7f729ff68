"""Finding the builds setup.py compiles from this package's own .py files (the simulator core, solver/simulator.py,
and its prefix cache, solver/kv_cache.py), and the plain-Python oracles beside them.

Each of those .py files is compiled by Cython under a name of its own (`_simulator_compiled`, `_kv_cache_compiled`,
with the C types of the .pxd of that name) and hands out its build's classes and functions at its end, unless:
  * VLLM_SHADOW_PURE_PYTHON is set (any value but empty or 0): the plain Python runs, the oracle and fallback;
  * the build is missing (VLLM_SHADOW_SKIP_COMPILE=1, or a checkout used without installing): the plain Python;
  * the build is older than its .py or .pxd (an edited source in a checkout): the plain Python, with a warning.
A build that is there but does not load is an error, not a fallback.

A plain module, never compiled: the compiled modules import it too, and nothing else of the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

PURE_PYTHON_VARIABLE = "VLLM_SHADOW_PURE_PYTHON"


def pure_requested() -> bool:
    """VLLM_SHADOW_PURE_PYTHON=1 (any value but empty or 0) selects the plain-Python core and pool."""
    return os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0")


def compiled_module(name: str) -> ModuleType | None:
    """The build `name`, or None where it was not built."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None


def stale_sources(build: ModuleType, source: Path, declarations: Path) -> list[str]:
    """In a source checkout, which of `source` and its `declarations` (.pxd) were edited since `build` was
    compiled from them; none in an installed package, whose build and sources came together."""
    if not declarations.exists() or build.__file__ is None:
        return []
    built = Path(build.__file__).stat().st_mtime
    return [path.name for path in (source, declarations) if path.stat().st_mtime > built]


def build_in_use(name: str, source: Path, declarations: Path, what: str, short: str) -> ModuleType | None:
    """The build `name` of `source` if it is to run: None where the plain Python is requested, where it was not
    built, or where it is stale (then with a warning: "the compiled `what`", "the plain-Python `short`")."""
    if pure_requested():
        return None
    build = compiled_module(name)
    if build is not None and stale_sources(build, source, declarations):
        warnings.warn(
            f"the compiled {what} is older than {', '.join(stale_sources(build, source, declarations))}: "
            f"running the plain-Python {short} until it is rebuilt (`pip install -e .`)",
            stacklevel=3,
        )
        return None
    return build


def load_as_python(name: str, source: Path, using: Mapping[str, ModuleType] | None = None) -> ModuleType:
    """`source` run as plain Python under the module name `name` (once: later calls return it), so that its
    classes never mix with its build's. `using` maps module names to the modules its imports must find instead
    of those in sys.modules (e.g. the plain-Python pool under the plain-Python core); they are put back after."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    replaced = {other: sys.modules.get(other) for other in using or {}}
    sys.modules.update(using or {})
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        for other, previous in replaced.items():
            if previous is None:
                sys.modules.pop(other, None)
            else:
                sys.modules[other] = previous
    return module
