# Two entry points: `make serve` (default model pair) and `make test` (the whole suite).
# Both create .venv on first use; without a GPU they install the CPU build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/qwen2.5-coder-1.5b+0.5b.toml
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv serve test test-fast fetch bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[dev,cuda]'
else
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
endif
	touch $@

fetch: venv
	$(BIN)/specdec fetch --config $(CONFIG)

# exec: the server replaces the recipe's shell, so a SIGTERM to make's child is the server's
# (make forwards its own SIGTERM to it too) and make exits with the server's status.
serve: fetch
	exec $(BIN)/specdec serve --config $(CONFIG)

test: venv
	$(BIN)/python -m pytest tests -q -ra --durations=25

test-fast: venv
	$(BIN)/python -m pytest tests/unit -q -m "not slow"

bench: fetch
	$(BIN)/python bench/latency.py --pair qwen --dataset code

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info
