# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs, runs every flow on the embedded default
#   make test   creates .venv if needed, installs, runs the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export ORCH_HOME ?= $(CURDIR)/var
export DAGSTER_HOME ?= $(CURDIR)/var/dagster

.PHONY: install demo test dev bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/orch demo

test: $(STAMP)
	@mkdir -p var
	$(BIN)/python -m pytest -q -n 2 --dist loadfile orch_project_tests --cov --cov-branch --cov-report=term:skip-covered --cov-report=json:var/coverage.json
	$(BIN)/python benchmarks/coverage_by_package.py var/coverage.json

dev: $(STAMP)
	$(BIN)/orch init
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(STAMP)
	$(BIN)/python benchmarks/support_batch.py

clean:
	rm -rf var
