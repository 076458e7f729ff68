# The two entry points a newcomer needs: `make demo` (the main job) and `make test` (the whole suite).
# Each builds the virtual environment it needs; re-running is cheap because the stamps below are reused.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The core: the project itself with its test tools.
$(VENV)/.core: $(BIN)/python pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(BIN)/shadow replay azure-conv --limit 2000 --policies 'vllm,vllm-v0,sarathi,orca,no-eviction,sjf'

test: $(VENV)/.core
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.core
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(VENV)/.core
	$(BIN)/python benchmarks/replay_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
