# Everything installs into .venv on first use; only python3 (3.11+) is needed.
# Every install takes the exact versions in .ci/constraints.txt (the lock), build
# tools included, so a fresh clone installs what was tested; `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := .ci/constraints.txt
PIP := $(BIN)/python -m pip --disable-pip-version-check
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: run test check lint lock kit promtool redis-server bench bench-quick bench-smoke soak clean

# pip and setuptools at the locked versions first: the project is then built with
# them (--no-build-isolation) rather than with whatever setuptools the registry has today.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) pip setuptools

# gateway/__init__.py too: the package version is read from it at install, so a version bump reinstalls.
$(VENV)/.installed-run: pyproject.toml $(LOCK) gateway/__init__.py | $(BIN)/python
	$(PIP) install --quiet --no-build-isolation -c $(LOCK) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) gateway/__init__.py | $(BIN)/python
	$(PIP) install --quiet --no-build-isolation -c $(LOCK) -e '.[test,bench]'
	touch $@ $(VENV)/.installed-run

## run: the gateway on :8080; demo mode (simulated upstream) unless COHERE_API_KEY is set; ARGS: more options
run: $(VENV)/.installed-run
	@if [ -n "$${COHERE_API_KEY:-}" ]; then exec $(BIN)/cohere-gateway $(ARGS); \
	else echo "COHERE_API_KEY is not set: starting in --demo mode"; exec $(BIN)/cohere-gateway --demo $(ARGS); fi

## test: lint, type-check, lint the Dockerfile, a 30 s soak, the benchmark smoke run, the test suite (the kit's checks included)
# The suite runs on two processes (pytest-xdist): most tests wait on sockets and timers, not the CPU.
test: $(VENV)/.installed-test lint promtool redis-server soak bench-smoke
	GATEWAY_REQUIRE_PROMTOOL=1 $(BIN)/python -m pytest -n 2

## check: the inner loop, in under two minutes: ruff, mypy, the layers, and the tests that start no gateway process (heavy ones left out), on uvloop alone
check: $(VENV)/.installed-test redis-server
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	GATEWAY_TEST_LOOPS=uvloop $(BIN)/python -m pytest -n 2 -q -x -m "not one_loop and not heavy" \
		--ignore=tests/test_replicas.py --ignore=tests/test_replicas_following.py --ignore=tests/test_workers.py --ignore=tests/test_resources.py

## kit: the operator's kit checks alone: docs links, keys and codes; deploy/ against its schemas, --check-config, promtool, metric names
kit: $(VENV)/.installed-test promtool
	GATEWAY_REQUIRE_PROMTOOL=1 $(BIN)/python -m pytest -q tests/test_docs.py tests/test_deploy.py

# promtool (for deploy/prometheus) comes from Debian's prometheus package: installed when missing, as bench/run.py does for wrk and nginx.
promtool:
	@if command -v promtool >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "promtool is missing and cannot be installed here (not root, or no apt-get): apt-get install prometheus" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; \
	command -v promtool >/dev/null

# redis-server (the replicas' tests start their own, docs/design.md §10) comes from Debian's redis-server package, installed when missing.
redis-server:
	@if command -v redis-server >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "redis-server is missing and cannot be installed here (not root, or no apt-get): apt-get install redis-server" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends redis-server >/dev/null; }; \
	command -v redis-server >/dev/null

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

## bench: the full benchmark (writes bench/RESULTS.md and the chart)
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

bench-quick: $(VENV)/.installed-test
	$(BIN)/python bench/run.py --quick

## bench-smoke: every benchmark scenario for a few seconds (CI: it runs, its JSON parses; numbers not checked)
bench-smoke: $(VENV)/.installed-test
	$(BIN)/python bench/run.py --smoke | tail -n 1 | $(BIN)/python -c 'import json, sys; json.loads(sys.stdin.read())'

## soak: fixed mixed load, fails if memory, fds, threads or upstream calls keep growing (SOAK_S=600 for 10 minutes)
soak: $(VENV)/.installed-test
	$(BIN)/python bench/soak.py --duration $(or $(SOAK_S),30)

## lock: refresh .ci/constraints.txt to the newest releases that pyproject.toml's ranges allow, then run the whole test run on them
lock:
	rm -rf $(VENV).lock
	$(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools
	$(VENV).lock/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[test,bench]'
	{ sed -n '/^#/p' $(LOCK); \
	  $(VENV).lock/bin/python -m pip freeze --all --exclude-editable | grep -iE '^(pip|setuptools)=='; \
	  $(VENV).lock/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(pip|setuptools)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV).lock $(VENV)
	$(MAKE) test

clean:
	rm -rf $(VENV) $(VENV).lock .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
