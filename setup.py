"""The compiled simulator core; everything else about the package is in pyproject.toml.

solver/simulator.py is compiled by Cython under its own name, `vllm_shadow.solver._simulator_compiled`, with the
C types of solver/_simulator_compiled.pxd, and so is the prefix cache it uses, solver/kv_cache.py, as
`vllm_shadow.solver._kv_cache_compiled` (solver/_kv_cache_compiled.pxd), and the shadow's engine tracker,
shadow/tracking/engine_state.py, as `vllm_shadow.tracking._engine_state_compiled`
(shadow/tracking/_engine_state_compiled.pxd), and its online calibrator, costmodel/linear.py, as
`vllm_shadow.costmodel._linear_compiled` (costmodel/_linear_compiled.pxd). The .py files are never shadowed: they
stay importable as plain Python (the oracles, and the fallback under VLLM_SHADOW_PURE_PYTHON=1), and
`vllm_shadow.solver.simulator.COMPILED` / `vllm_shadow.solver.kv_cache.COMPILED` say which core and pool run. A
failed compilation fails the install; VLLM_SHADOW_SKIP_COMPILE=1 builds no extension (for a machine without a C
compiler; the pure core then runs, several times slower).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import Extension, setup

# The compiled modules (their .pxd beside the source, e.g. solver/<name>.pxd) and the .py each is compiled from.
MODULES = {
    "_simulator_compiled": "solver/simulator.py",
    "_kv_cache_compiled": "solver/kv_cache.py",
    "_engine_state_compiled": "shadow/tracking/engine_state.py",
    "_linear_compiled": "costmodel/linear.py",
}
# The modules whose C integer arithmetic is checked for overflow (see solver/_simulator_compiled.pxd).
CHECKED_OVERFLOW = {"_simulator_compiled", "_engine_state_compiled"}
# A compiled module's float arithmetic is its .py's, operation for operation: never a*b+c fused into one rounding
# (gcc contracts it wherever the target has fused multiply-add, e.g. aarch64).
EXACT_FLOATS = ["-ffp-contract=off"]
# The repository's top-level folders as the package's (pyproject.toml's package-dir).
PACKAGE_DIRS = {"shadow": "vllm_shadow", "solver": "vllm_shadow/solver", "costmodel": "vllm_shadow/costmodel"}


def package_path(source: str) -> Path:
    """The package folder a source file installs to: shadow/tracking/engine_state.py -> vllm_shadow/tracking."""
    top, *rest = Path(source).parent.parts
    return Path(PACKAGE_DIRS[top], *rest)


def compiled_core() -> list[Extension]:
    if os.environ.get("VLLM_SHADOW_SKIP_COMPILE", "") not in ("", "0"):
        return []
    from Cython.Build import cythonize  # a build requirement (pyproject.toml [build-system])

    # Cython finds a module's .pxd by its package path (vllm_shadow/solver/), which the repository spells solver/:
    # the .pxd is staged there for the build.
    include = Path("build/cython/include")
    for module, module_source in MODULES.items():
        staged = include / package_path(module_source)
        staged.mkdir(parents=True, exist_ok=True)
        for package in (include / "vllm_shadow", staged):
            (package / "__init__.pxd").touch()
        source, copy = Path(module_source).with_name(f"{module}.pxd"), staged / f"{module}.pxd"
        # Copied only when it changed: a fresh copy's time stamp would make cythonize regenerate (and the build
        # recompile) both modules at every install, not just the one whose sources changed.
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)
            # cythonize does not see the staged .pxd as a dependency of the .py: its C must be generated anew.
            Path("build/cython", MODULES[module]).with_suffix(".c").unlink(missing_ok=True)
    extensions = [
        *(
            Extension(
                ".".join((*package_path(source).parts, module)), [source], extra_compile_args=EXACT_FLOATS
            )
            for module, source in MODULES.items()
        ),
        # The gRPC ingest's wire reader (adapters/wire.py's fast path), a .pyx of its own: no .pxd.
        Extension("vllm_shadow.adapters._wire_compiled", ["adapters/_wire_compiled.pyx"]),
    ]
    checked = [e for e in extensions if e.name.rsplit(".", 1)[-1] in CHECKED_OVERFLOW]
    unchecked = [e for e in extensions if e not in checked]
    return [
        *cythonize_all(cythonize, checked, str(include), True),
        *cythonize_all(cythonize, unchecked, str(include), False),
    ]


def cythonize_all(
    cythonize, extensions: list[Extension], include: str, overflowcheck: bool
) -> list[Extension]:
    return cythonize(
        extensions,
        include_path=[include],
        build_dir="build/cython",  # the generated C stays out of the source tree
        compiler_directives={
            "language_level": 3,
            # The .pxd is the only source of C types: the .py's annotations (`int`, `list[...]`) keep their
            # Python meaning, so both cores accept the same arguments.
            "annotation_typing": False,
            # C integer arithmetic that would overflow raises OverflowError instead of wrapping (the simulator
            # core's times are C 64-bit integers; simulator.simulate then runs the plain-Python core).
            "overflowcheck": overflowcheck,
        },
    )


setup(ext_modules=compiled_core())
