# Set-up and the two everyday commands. Each target creates .venv on first use and installs the pinned CPU
# build of PyTorch before the package, so pip never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.runtime        ## generate from the bundled default model for several prompts at once
	$(BIN)/sirocco generate --max-tokens 96 \
	    "The with statement" "Return a new dictionary" "The sliding window"

test: $(VENV)/.test           ## the whole test suite
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test          ## sirocco against transformers on the same weights (takes minutes)
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
