# The two set-up commands in the README: `make demo` and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NPM_STAMP := node_modules/.installed-$(shell cat package-lock.json | cksum | cut -d' ' -f1)

.PHONY: test demo lint protos check-system check-system-tests clean

test: check-system-tests $(STAMP) $(NPM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

demo: check-system $(STAMP)
	$(BIN)/adrec demo

lint: $(STAMP) $(NPM_STAMP)
	$(BIN)/ruff check .
	node_modules/.bin/buf lint protos

protos: $(STAMP)
	$(BIN)/python protos/generate.py

check-system:
	@scripts/check-system

check-system-tests:
	@scripts/check-system --for-tests

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[job,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(NPM_STAMP): package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
