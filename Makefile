# Local entry points. `make up` is all a newcomer needs: it creates the virtual
# environment on first use, installs the project and starts the whole system.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
# Touched after a successful install: reinstall only when pyproject.toml changes
# (or the venv is recreated, since the stamp lives inside it).
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
DELF_UP_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install up test lint demo proto clean

help:
	@echo "make up       install if needed, then start the whole system (delf up)"
	@echo "make test     install if needed, then run all tests (PYTEST_ARGS='-m \"not slow\"' ...)"
	@echo "make demo     install if needed, then index a few sample photos and search them"
	@echo "make lint     install if needed, then ruff check (rules in pyproject.toml)"
	@echo "make proto    regenerate the gRPC stubs from protos/"
	@echo "make install  create $(VENV) and install the project into it"
	@echo "make clean    remove local state (data/)"

$(VPY):
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(VPY)
	$(VPY) -m pip install -e '.[test]'
	@touch $@

install: $(INSTALLED)

up: $(INSTALLED)
	$(VENV)/bin/delf up $(DELF_UP_ARGS)

test: $(INSTALLED)
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

demo: $(INSTALLED)
	$(VPY) scripts/demo.py

proto: $(INSTALLED)
	PYTHON=$(VPY) scripts/gen_protos.sh

clean:
	rm -rf data/
