"""What `pip install` puts where: the wheel's import names, entry points and data, and the light engine side.

The wheel is built offline from a copy of the sources (the build writes `build/` and egg-info beside them), with
the setuptools of this environment.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import import_module
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "vllm_shadow"
# The repository's folders and the packages they install as (pyproject.toml's package-dir).
SOURCE_FOLDERS = {
    "shadow": NAMESPACE,
    "adapters": f"{NAMESPACE}.adapters",
    "solver": f"{NAMESPACE}.solver",
    "costmodel": f"{NAMESPACE}.costmodel",
}
# Everything else a vLLM environment gets from `pip install vllm-shadow` comes with an extra.
HOOK_REQUIREMENTS = {"grpcio", "protobuf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in SOURCE_FOLDERS:
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    subprocess.run(
        [*pip_wheel, "--wheel-dir", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [p for p in wheel.namelist() if re.fullmatch(rf"[^/]+\.dist-info/{name}", p)]
    return wheel.read(path).decode()


def _installed_path(path: Path) -> str:
    """Where a file of the repository lies in the wheel."""
    relative = path.relative_to(REPO)
    package = SOURCE_FOLDERS[relative.parts[0]]
    return "/".join([*package.split("."), *relative.parts[1:]])


@pytest.mark.slow
def test_the_wheel_installs_one_import_name(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert top == {NAMESPACE}
    assert _dist_info(wheel, "top_level.txt").split() == [NAMESPACE]


@pytest.mark.slow
def test_every_package_of_the_source_folders_is_in_the_wheel(wheel):
    # A sub-package missing from pyproject.toml's list would install without its modules.
    names = set(wheel.namelist())
    inits = [p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("__init__.py")]
    assert len(inits) >= len(SOURCE_FOLDERS)
    missing = [str(p.relative_to(REPO)) for p in inits if _installed_path(p) not in names]
    assert not missing, f"packages left out of the wheel: {missing}"


@pytest.mark.slow
def test_entry_points_point_into_the_namespace(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    script = entry_points["console_scripts"]["shadow"]
    plugin = entry_points["vllm.stat_logger_plugins"]["shadow"]
    assert script == f"{NAMESPACE}.cli.main:main"
    assert plugin == f"{NAMESPACE}.adapters.vllm.stat_logger:ShadowStatLogger"
    names = set(wheel.namelist())
    for target in (script, plugin):
        module, _, attribute = target.partition(":")
        assert module.replace(".", "/") + ".py" in names
        if "stat_logger" not in module:  # that one imports vLLM; the hook test below loads it
            assert callable(getattr(import_module(module), attribute))


@pytest.mark.slow
def test_the_package_data_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    data = [
        *(REPO / "adapters" / "data" / "traces").iterdir(),
        REPO / "adapters" / "data" / "traces" / "NOTICE.md",
        REPO / "adapters" / "data" / "tiny-llama" / "config.json",
        *(REPO / "costmodel" / "data" / "models").glob("*.json"),
        *(REPO / "costmodel" / "data" / "profiles").glob("*.json"),
        *(REPO / "adapters" / "proto").glob("*.proto"),
    ]
    assert len(data) >= 10
    missing = [str(p.relative_to(REPO)) for p in data if _installed_path(p) not in names]
    assert not missing, f"data left out of the wheel: {missing}"


@pytest.mark.slow
def test_the_hook_needs_only_grpc_and_protobuf(wheel):
    metadata = _dist_info(wheel, "METADATA")
    assert re.search(r"^Name: vllm-shadow$", metadata, re.MULTILINE)
    unconditional = {
        re.split(r"[<>=!~ ;\[]", line.removeprefix("Requires-Dist: "))[0].lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    }
    assert unconditional == HOOK_REQUIREMENTS
    assert "Provides-Extra: shadow" in metadata


# ---- the engine side imports light -------------------------------------------------------------------------

# What of ours may load inside vLLM's process: the hook, the plugin, the schema, the publisher, the wire code and
# the sinks the SHADOW_* variables name.
ENGINE_SIDE = {
    NAMESPACE,
    f"{NAMESPACE}.adapters",
    f"{NAMESPACE}.adapters.events",
    f"{NAMESPACE}.adapters.publisher",
    f"{NAMESPACE}.adapters.wire",
    f"{NAMESPACE}.adapters._wire_compiled",  # the wire code's compiled reader, where it is built
    f"{NAMESPACE}.adapters.validation",
    f"{NAMESPACE}.adapters.proto",
    f"{NAMESPACE}.adapters.proto.shadow_events_pb2",
    f"{NAMESPACE}.adapters.grpc_server",
    f"{NAMESPACE}.adapters.grpc_ingest",
    f"{NAMESPACE}.adapters.recorder",
    f"{NAMESPACE}.adapters.vllm",
    f"{NAMESPACE}.adapters.vllm.scheduler",
    f"{NAMESPACE}.adapters.vllm.stat_logger",
    f"{NAMESPACE}.adapters.vllm.mirror",
    f"{NAMESPACE}.adapters.vllm.env",
    f"{NAMESPACE}.adapters.vllm.engine_info",
}
# The shadow's dependencies (its extras): none may load in the engine because of us.
HEAVY = ("ortools", "ray", "matplotlib", "rich", "numpy", "prometheus_client", "opentelemetry", "torch")

_LOAD_SINKS = """
from vllm_shadow.adapters.vllm.env import ShadowEnv
for sink in ShadowEnv(address="127.0.0.1:1", record={record!r}).sinks():
    sink.close()
"""


def _modules_loaded_by(code: str, *, first: str = "") -> tuple[list[str], list[str]]:
    """Run `first`, then `code`, in a fresh interpreter: the modules of ours loaded in all, and the top-level
    names of the third-party modules that `code` loaded beyond `first`'s."""
    report = (
        "new = set(sys.modules) - before\n"
        f"ours = sorted(m for m in sys.modules if m.startswith({NAMESPACE!r}))\n"
        'print(json.dumps([ours, sorted({m.split(".")[0] for m in new})]))\n'
    )
    script = f"import json, sys\n{first}\nbefore = set(sys.modules)\n{code}\n{report}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, new = json.loads(done.stdout.strip().splitlines()[-1])
    return ours, new


def test_the_engine_side_without_vllm_loads_no_shadow_dependency(tmp_path):
    # The publisher, the scheduler mirror, the environment and the sinks: everything of the hook but vLLM's classes.
    ours, new = _modules_loaded_by(
        "import vllm_shadow.adapters.vllm.mirror\n" + _LOAD_SINKS.format(record=str(tmp_path / "r.jsonl"))
    )
    assert set(ours) <= ENGINE_SIDE, sorted(set(ours) - ENGINE_SIDE)
    assert f"{NAMESPACE}.adapters.wire" in ours and f"{NAMESPACE}.adapters.publisher" in ours
    assert not [name for name in new if name in HEAVY]


@pytest.mark.integration
@pytest.mark.slow
def test_importing_the_hook_in_vllm_loads_the_schema_publisher_and_wire_only(tmp_path):
    # vLLM's own modules first (the hook subclasses them): what loads after that is the hook's doing.
    vllm_first = (
        "import vllm.config, vllm.v1.core.sched.scheduler, vllm.v1.core.sched.async_scheduler, "
        "vllm.v1.metrics.loggers"
    )
    hook = (
        "import vllm_shadow\n"
        "vllm_shadow.MirrorScheduler, vllm_shadow.MirrorAsyncScheduler\n"
        "import vllm_shadow.adapters.vllm.stat_logger\n"
        + _LOAD_SINKS.format(record=str(tmp_path / "r.jsonl"))
    )
    ours, new = _modules_loaded_by(hook, first=vllm_first)
    assert set(ours) <= ENGINE_SIDE, sorted(set(ours) - ENGINE_SIDE)
    assert {f"{NAMESPACE}.adapters.vllm.scheduler", f"{NAMESPACE}.adapters.vllm.stat_logger"} <= set(ours)
    assert not [name for name in new if name in HEAVY]
