# Set-up and the two everyday commands. Each target creates .venv on first use and installs the pinned CPU
# build of PyTorch before the package, so pip never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# A second venv with the runtime dependencies only, as a plain `pip install` gives them: the smoke stage runs
# every verb there, so a module needed at run time but declared only in the test extras fails `make test`.
PLAIN  ?= .venv-plain

.PHONY: demo test test-fast check smoke bench pictures screenshots browser clean

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

check: $(VENV)/.test          ## lint and import order, types, doctests
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules src/sirocco --ignore=src/sirocco/cli/__main__.py

# Made anew whenever pyproject.toml changes, so a dependency taken out of it is gone from here too.
$(PLAIN)/.runtime: pyproject.toml
	rm -rf $(PLAIN)
	$(PYTHON) -m venv $(PLAIN)
	$(PLAIN)/bin/python -m pip install --quiet --upgrade pip
	$(PLAIN)/bin/pip install --quiet $(TORCH)
	$(PLAIN)/bin/pip install --quiet .
	touch $@

# The tree as it is now, installed as a wheel (package data included); build/ goes first, since files left in it
# by an earlier build would ride along into the wheel.
smoke: $(PLAIN)/.runtime      ## every verb once on the bundled models, installed without the test extras
	rm -rf build
	$(PLAIN)/bin/pip install --quiet --no-deps --force-reinstall .
	$(PLAIN)/bin/python tests/smoke.py

# The chat page's tests drive Debian's chromium (Playwright's own browser download is not used). As root (CI)
# apt-get installs it; otherwise through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:                      ## Debian's chromium for the chat page's tests, installed when it is missing
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	    $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

test: check smoke browser     ## every check, the plain-install smoke stage, then the whole suite (browser tests too)
	SIROCCO_BROWSER_TESTS=require $(BIN)/python -m pytest -q

test-fast: check              ## every check, then the suite without the slow and benchmark tests
	$(BIN)/python -m pytest -q -m "not slow and not benchmark"

bench: $(VENV)/.test          ## sirocco against transformers on the same weights (takes minutes)
	$(BIN)/python benchmarks/bench_inference.py

PICTURES := docs/pictures
pictures: $(VENV)/.runtime    ## regenerate the gallery of docs/pictures.md from real runs
	$(BIN)/sirocco -q viz masks --prompts 7,5,6 --window 3 --chunk-size 4 --max-tokens 2 --out $(PICTURES)/masks.png >/dev/null
	$(BIN)/sirocco -q viz cache --prompts 6 --window 4 --max-tokens 6 --out $(PICTURES)/cache.png >/dev/null
	$(BIN)/sirocco -q viz cache --prompts 6 --window 4 --max-tokens 14 --draft-tokens 3 --out $(PICTURES)/cache-rollback.png >/dev/null
	$(BIN)/sirocco -q viz receptive-field --window 3 --layers 5 --out $(PICTURES)/receptive-field.png >/dev/null
	$(BIN)/sirocco -q viz moe --out $(PICTURES)/moe.png >/dev/null
	$(BIN)/sirocco -q viz pipeline --ranks 2 --micro-batches 4 --out $(PICTURES)/pipeline.png >/dev/null
	$(BIN)/sirocco -q viz pipeline --ranks 2 --micro-batches 4 --schedule 1f1b --out $(PICTURES)/pipeline-1f1b.png >/dev/null
	$(BIN)/sirocco -q viz memory --out $(PICTURES)/memory.png >/dev/null

screenshots: $(VENV)/.test browser   ## the chat page's screenshots in docs/pictures, from the bundled models
	$(BIN)/python tests/web_screenshots.py --out $(PICTURES)

clean:
	rm -rf $(VENV) $(PLAIN) build dist src/*.egg-info
