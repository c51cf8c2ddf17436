# The two commands of the README: `make run` and `make test`. Each creates .venv and
# installs what it needs first, so both work on a fresh clone.
#
# Supported Pythons: 3.11, 3.12 and 3.13 (README, pyproject.toml). PYTHON defaults to the
# first of them that runs here, 3.11 first (its torch CPU wheel lies on the machines' disk;
# the others download torch from PyPI). A pyenv shim counts only when it runs; pyenv's own
# folders are looked in too. `make install PYTHON=python3.13` picks one by hand.
SUPPORTED_PYTHONS := 3.11 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
python_for = $(firstword $(foreach p,$(shell command -v python$(1) 2>/dev/null) \
    $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python$(1)),$(if $(shell $(p) -c 'print(1)' 2>/dev/null),$(p))))
$(foreach v,$(SUPPORTED_PYTHONS),$(eval PYTHON_$(v) := $(call python_for,$(v))))
ifndef PYTHON
PYTHON := $(firstword $(foreach v,$(SUPPORTED_PYTHONS),$(PYTHON_$(v))))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install pythons run serve test lint bench clean

$(STAMP): requirements.txt requirements_dashboard.txt requirements-dev.txt static/package-lock.json
	@test -n "$(PYTHON)" || { echo "no supported Python ($(SUPPORTED_PYTHONS)) found: install one or pass PYTHON=" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	npm ci --prefix static --no-audit --no-fund --ignore-scripts
	touch $(STAMP)

install: $(STAMP)

# `make pythons`: a runtime environment .venvs/pyX.Y for every other supported Python found
# here, for the shutdown test that runs the server on each of them (CI builds them).
VENV_PYTHON_VERSION := $(shell $(if $(wildcard $(BIN)/python),$(BIN)/python,$(or $(PYTHON),false)) \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
pythons: $(foreach v,$(filter-out $(VENV_PYTHON_VERSION),$(SUPPORTED_PYTHONS)),$(if $(PYTHON_$(v)),.venvs/py$(v)/.installed))

.venvs/py%/.installed: requirements.txt requirements_dashboard.txt
	test -x $(@D)/bin/python || $(PYTHON_$*) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet -r requirements_dashboard.txt
	touch $@

run: install
	$(BIN)/python app.py

serve: install
	$(BIN)/gunicorn -w 4 -b 0.0.0.0:5000 --worker-class eventlet app:app

test: install
	$(BIN)/python -m pytest

# Types and style (configured in pyproject.toml): zero findings, before every commit and in CI
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .venvs .pytest_cache .coverage htmlcov
