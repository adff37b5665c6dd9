# Two commands: `make run` and `make test`. Both create .venv on first use and
# reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ifeq ($(OS),Windows_NT)
BIN    := $(VENV)/Scripts
endif

.PHONY: run test lint typecheck format install clean interop test-tools

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

# Two pytest processes (TEST_WORKERS=0 for one): most service tests wait on the service, so two share the
# two cores of an acquisition-sized machine well. worksteal balances the long tests at the end.
TEST_WORKERS ?= 2
test: lint test-tools
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# ruff (settings in pyproject.toml): lint rules and formatting, checked, never rewritten; `make format` rewrites.
# Then mypy: qc strict, daemon and windows_service in the default mode (pyproject.toml [tool.mypy]).
lint: $(VENV)/.installed-test
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .
	$(MAKE) --no-print-directory typecheck

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Tools some tests drive besides Python: Debian's chromium (the status page in a real headless
# browser) and dbus-daemon (desktop notifications). Installed when missing and possible (root with
# apt-get); otherwise those tests are skipped and say why.
test-tools:
	@for tool in chromium:chromium dbus-daemon:dbus; do \
	  cmd=$${tool%%:*}; pkg=$${tool##*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $$pkg for the tests (apt-get)"; \
	    timeout 900 apt-get install -y -qq $$pkg >/dev/null 2>&1 || echo "note: could not install $$pkg; its tests will be skipped"; \
	  else echo "note: $$cmd is missing; its tests will be skipped"; fi; \
	done

# imageqc's IPRs read back by cellbin2 1.2.1 in a Python 3.8 venv (docs/INTEROP.md); not part of `make test`.
# CELLBIN2_PYTHON=/path/to/python reuses a venv that has cellbin2; INTEROP_PYTHON picks the 3.8 for .interop-venv/.
interop: $(VENV)/.installed-run
	PROJECT_PYTHON=$(BIN)/python sh interop/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
