# ckpt-operator: `make demo` and `make test` work on a fresh machine (they install what they need).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install tools lint typecheck crd crd-check test test-unit test-integration test-e2e demo bench bench-scale \
        fault cluster-up cluster-down clean

install: $(STAMP)  ## venv with the package (editable), torch, the frameworks the integrations test, dev tools

# pip keeps every wheel it downloads in its cache (~/.cache/pip), kept between runs like the Go tools' cache
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,torch,frameworks]'
	touch $@

tools:  ## build etcd, kube-apiserver/scheduler/controller-manager, kubectl, helm, kwok, kstatus, kube-score and Kueue (cached by version)
	bash hack/build-tools.sh all

lint: install  ## ruff + mypy --strict on both packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

crd: install  ## regenerate the CRD from the pydantic models
	$(PY) hack/gen-crd.py

test: install tools lint  ## the whole suite: lint, types, unit, every SDK crash point, integration, e2e
	$(PY) -m pytest --durations=25 tests/unit tests/fault tests/integration tests/e2e

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install tools
	$(PY) -m pytest tests/integration

test-e2e: install tools
	$(PY) -m pytest tests/e2e

demo: install tools  ## local control plane + operator + examples/trainingjob.yaml, preempted and resumed
	$(PY) -m tests.cluster.demo

fault: install  ## randomized SDK fault injection: >= 500 trials (random point, fault, sync/async, corrupt newest)
	$(PY) -m tests.fault.harness random --trials $${TRIALS:-500}

bench: install  ## SDK benchmarks (results go to benchmarks/README.md by hand)
	$(PY) benchmarks/sdk_bench.py
	$(PY) benchmarks/sharded_save.py
	$(PY) benchmarks/resharded_load.py

bench-scale: install tools  ## the client CPU per request, per hand-off and per token; operator vs the batch/v1 Job controller on kwok fake nodes (JOBS=1000)
	$(PY) benchmarks/operator_requests.py
	$(PY) benchmarks/operator_loop.py
	$(PY) benchmarks/operator_scale.py --jobs $${JOBS:-1000}

cluster-up: install tools  ## start the local control plane in the background (.cluster/kubeconfig; CKPT_TEST_KUEUE=1: with Kueue)
	$(PY) -m tests.cluster up

cluster-down:
	$(PY) -m tests.cluster down

clean: cluster-down
	rm -rf .cluster .pytest_cache .mypy_cache .ruff_cache
