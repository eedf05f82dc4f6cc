# Two set-up commands: `make demo` and `make test`. Both create .venv when absent and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# pytest-xdist processes of `make test` (1: none, all tests in this process)
TEST_WORKERS ?= 2

.PHONY: env demo test lint clean

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: env
	$(BIN)/python -m diffptq.demo

test: env
	$(BIN)/python -m pytest -p no:cacheprovider $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) tests

lint: env
	$(BIN)/python -m ruff check diffptq tests qronos_diffusion LogSnr-DiT LogSnr-Unet benchmarks

clean:
	rm -rf $(VENV) results
