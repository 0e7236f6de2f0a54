# The two README commands: `make demo` and `make test`. Both go through `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= build/demo
# NVIDIA's type stubs of TensorRT 10.13's bindings, which the TensorRT stand-in is held to
# (tests/standins/stubs.py); outside site-packages, where their tensorrt/ folder would import
TRT_STUBS := 10.13.0.35.1

.PHONY: setup setup-board demo test test-board lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[runtime,cpu,export,serve,peers,dev]'
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/trt-stubs 'tensorrt-stubs==$(TRT_STUBS)'
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py --workdir $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q

# The board-like leg: the torch-free tests (`board` marker) in a venv as a Jetson has it: JetPack
# 6's Python 3.10, numpy < 2, the runtime/jetpack6/serve extras and no torch (PyPI's CPU
# onnxruntime stands in for NVIDIA's onnxruntime-gpu). It runs on the exports the dev leg made
# in FILA_ARTIFACTS_DIR (.ci/run runs `make test` first).
BOARD_PY ?= $(shell pyenv root 2>/dev/null)/versions/3.10.13/bin/python
BOARD_VENV := .venv-board
BOARD_STAMP := $(BOARD_VENV)/.installed

$(BOARD_STAMP): pyproject.toml constraints/jetpack6.txt
	test -x $(BOARD_VENV)/bin/python || $(BOARD_PY) -m venv $(BOARD_VENV)
	$(BOARD_VENV)/bin/python -m pip install -q --upgrade pip
	$(BOARD_VENV)/bin/python -m pip install -q -c constraints/jetpack6.txt -e '.[runtime,jetpack6,serve]' onnxruntime pytest pytest-timeout httpx openai
	$(BOARD_VENV)/bin/python -m pip install -q --no-deps --target $(BOARD_VENV)/trt-stubs 'tensorrt-stubs==$(TRT_STUBS)'
	touch $(BOARD_STAMP)

setup-board: $(BOARD_STAMP)

test-board: $(BOARD_STAMP)
	$(BOARD_VENV)/bin/python -c "import sys, numpy, importlib.util as u; print('board leg: Python', sys.version.split()[0], '| numpy', numpy.__version__, '| torch', 'installed' if u.find_spec('torch') else 'absent')"
	FILA_BOARD_LEG=1 $(BOARD_VENV)/bin/python -m pytest -q -m board

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build .pytest_cache
