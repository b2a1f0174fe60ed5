# The two set-up commands in the README: `make demo` and `make test`.
# Both create .venv and install what they need on first use, at the versions the lock
# files in requirements/ pin (`make lock` rewrites them after a change to pyproject.toml).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/dev.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
PIP_COMPILE_FLAGS := --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
NPM_STAMP := node_modules/.installed-$(shell cat package-lock.json | cksum | cut -d' ' -f1)

.PHONY: test test-fast static demo lint lock protos check-system check-system-tests clean images images-smoke

test: check-system-tests $(STAMP) $(NPM_STAMP)
	@$(MAKE) --no-print-directory static
	$(BIN)/pytest

# The quick loop while editing: everything but the tests that start a JVM (see the
# spark and job markers in pyproject.toml); `make test` runs those too.
test-fast: check-system-tests $(STAMP) $(NPM_STAMP)
	@$(MAKE) --no-print-directory static
	$(BIN)/pytest -m "not spark"

# Lint, formatting and types (strict on adrec.core; see [tool.mypy] in pyproject.toml).
static: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: check-system $(STAMP)
	$(BIN)/adrec demo

lint: $(STAMP) $(NPM_STAMP)
	$(BIN)/ruff check .
	node_modules/.bin/buf lint protos

protos: $(STAMP)
	$(BIN)/python protos/generate.py

# Both images from deploy/images, with buildah and no Docker engine; where the pinned bases
# cannot be pulled it creates local stand-ins for them from Debian's packages (as root).
images:
	scripts/build-images

# Builds both, runs the job image on tiny data and the services image read-only, checks a
# Recommend answer and the drain on SIGTERM. Slow, so not part of `make test`.
images-smoke: $(STAMP)
	scripts/smoke-images

check-system:
	@scripts/check-system

check-system-tests:
	@scripts/check-system --for-tests

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# One lock per image: the services image (base dependencies), the job image (plus the job
# extra) and development (plus dev). pip-compile keeps every pin it can while resolving.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet pip-tools==7.6.2
	$(VENV)-lock/bin/pip-compile $(PIP_COMPILE_FLAGS) -o requirements/services.txt pyproject.toml
	$(VENV)-lock/bin/pip-compile $(PIP_COMPILE_FLAGS) --extra job -o requirements/job.txt pyproject.toml
	$(VENV)-lock/bin/pip-compile $(PIP_COMPILE_FLAGS) --extra job --extra dev -o $(LOCK) pyproject.toml
	rm -rf $(VENV)-lock

$(NPM_STAMP): package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) $(VENV)-lock node_modules .pytest_cache .ruff_cache .mypy_cache
