# The two commands of the README. Both create .venv and install what is missing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: quickstart test lint install clean bench

quickstart: $(STAMP)
	$(BIN)/kiln train experiment=quickstart

# Style and types first (seconds), then the suite: CI runs both through `make test`. The suite ends by listing
# its 20 slowest tests, and leaves every test's time in $(JUNIT): the goal is 25 minutes on a 2-core machine,
# and these say where they go. Two pytest-xdist processes, a test file each at a time (a file's module fixtures
# are built once), the slowest files first (tests/conftest.py SLOW_FILES; xdist's own reordering by test count
# is off). A third process does not help: the suite is CPU-bound (interpreter, Ray and torchrun start-up), and
# with three the cores were idle 2% of the time and the run no shorter (docs/benchmarks.md).
JUNIT ?= .pytest_cache/last-run.xml
WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 --junitxml=$(JUNIT) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

# Issue 15's benchmarks, one after another, rewriting their tables in docs/benchmarks.md (about 17 min here;
# BENCH_ARGS="--only throughput --quick" for a smoke run). Never part of `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) kiln-runs
