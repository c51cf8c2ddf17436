# The two commands of the README: `make run` and `make test`. Each creates .venv and
# installs what it needs first, so both work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve test bench clean

$(STAMP): requirements.txt requirements_dashboard.txt requirements-dev.txt static/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	npm ci --prefix static --no-audit --no-fund --ignore-scripts
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python app.py

serve: install
	$(BIN)/gunicorn -w 4 -b 0.0.0.0:5000 --worker-class eventlet app:app

test: install
	$(BIN)/python -m pytest

bench: install
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .coverage htmlcov
