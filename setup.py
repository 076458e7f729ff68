"""The compiled simulator core; everything else about the package is in pyproject.toml.

solver/simulator.py is compiled by Cython under its own name, `vllm_shadow.solver._simulator_compiled`, with the
C types of solver/_simulator_compiled.pxd. The .py is never shadowed: it stays importable as plain Python (the
oracle, and the fallback under VLLM_SHADOW_PURE_PYTHON=1), and `vllm_shadow.solver.simulator.COMPILED` says which
core `simulate` is. A failed compilation fails the install; VLLM_SHADOW_SKIP_COMPILE=1 builds no extension (for
a machine without a C compiler; the pure core then runs, several times slower).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import Extension, setup


def compiled_core() -> list[Extension]:
    if os.environ.get("VLLM_SHADOW_SKIP_COMPILE", "") not in ("", "0"):
        return []
    from Cython.Build import cythonize  # a build requirement (pyproject.toml [build-system])

    # Cython finds a module's .pxd by its package path (vllm_shadow/solver/), which the repository spells solver/:
    # the .pxd is staged there for the build.
    staged = Path("build/cython/include/vllm_shadow/solver")
    staged.mkdir(parents=True, exist_ok=True)
    for package in (staged.parent, staged):
        (package / "__init__.pxd").touch()
    shutil.copyfile("solver/_simulator_compiled.pxd", staged / "_simulator_compiled.pxd")
    return cythonize(
        [Extension("vllm_shadow.solver._simulator_compiled", ["solver/simulator.py"])],
        include_path=[str(staged.parent.parent)],
        build_dir="build/cython",  # the generated C stays out of the source tree
        compiler_directives={
            "language_level": 3,
            # The .pxd is the only source of C types: the .py's annotations (`int`, `list[...]`) keep their
            # Python meaning, so both cores accept the same arguments.
            "annotation_typing": False,
        },
    )


setup(ext_modules=compiled_core())
