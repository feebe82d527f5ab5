# DuoServe. `make run` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp changes whenever pyproject.toml does, so `make setup` is a no-op when nothing changed.
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
STORE  ?= models/store
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: help setup models run test lint typecheck bench protos clean

help:
	@echo "make setup   create .venv with the gateway, torch, tensorflow-cpu, TorchServe, test tools"
	@echo "make models  build the example models into $(STORE)/ (deterministic, incremental)"
	@echo "make run     setup + models + the gateway on http://$(HOST):$(PORT) (embedded backends)"
	@echo "make test    setup + models + v2-servers + the whole test suite (starts real TorchServe,"
	@echo "             MLServer, Triton, Prometheus)"
	@echo "make v2-servers  MLServer and Triton, each in its own venv (.venv-mlserver, .venv-triton)"
	@echo "make lint    ruff + mypy --strict on the gateway"
	@echo "make bench   the reference benchmark; writes bench-results/ and prints the table"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# tensorflow-serving-api pins the full `tensorflow` package; its protos work with tensorflow-cpu.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps tensorflow-serving-api==2.21.0
	rm -f $(VENV)/.installed-*
	touch $@

models: setup
	$(PY) -m models.build --store $(STORE)

run: setup models
	$(VENV)/bin/duoserve serve --config models.yaml --host $(HOST) --port $(PORT)

test: setup models v2-servers
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check services tests bench deploy k8s models
	$(VENV)/bin/mypy

protos: setup
	bash services/gateway/duoserve/protos/generate.sh

clean:
	rm -rf $(STORE) .pytest_cache .mypy_cache .ruff_cache bench-results

-include mk/*.mk
