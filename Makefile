# Two commands: `make run` and `make test`. Both create .venv on first use and
# reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ifeq ($(OS),Windows_NT)
BIN    := $(VENV)/Scripts
endif

.PHONY: run test install clean interop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/imageqc run $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# imageqc's IPRs read back by cellbin2 1.2.1 in a Python 3.8 venv (docs/INTEROP.md); not part of `make test`.
# CELLBIN2_PYTHON=/path/to/python reuses a venv that has cellbin2; INTEROP_PYTHON picks the 3.8 for .interop-venv/.
interop: $(VENV)/.installed-run
	PROJECT_PYTHON=$(BIN)/python sh interop/run.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
