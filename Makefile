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
# and these say where they go. Three pytest-xdist processes on two cores, a test file each at a time (a file's
# module fixtures are built once), the slowest files first (tests/conftest.py SLOW_FILES; xdist's own
# reordering by test count is off): much of a story's time is waiting on Ray and torchrun, and with two
# processes the cores sat idle 28% of the time (docs/benchmarks.md), with three 8%.
JUNIT ?= .pytest_cache/last-run.xml
WORKERS ?= 3
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
