# langmerge: the two commands after cloning are `make up` (the main job on a local control plane) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up down status venv lint test test-unit test-integration controlplane crds bench bench-engine clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[trainer,serving,bench,dev]'
	@touch $(STAMP)

venv: $(STAMP)

## The main job: local control plane + operator + local Job runner + the 3-language sample, then a maintenance update.
up: $(STAMP)
	$(BIN)/langmerge up

down: $(STAMP)
	$(BIN)/langmerge down

status: $(STAMP)
	$(BIN)/langmerge status

## Build (once, cached under ~/.cache/langmerge) the local kube-apiserver and install etcd.
controlplane: $(STAMP)
	$(BIN)/langmerge controlplane build

## The CRDs from the API models: crds/ (the single source) and an identical copy in the Helm chart's crds/.
crds: $(STAMP)
	$(BIN)/langmerge crds
	$(BIN)/langmerge crds --output charts/langmerge/crds

lint: $(STAMP)
	$(BIN)/ruff check operator trainer_image tests benchmarks
	$(BIN)/ruff format --check operator trainer_image tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/langmerge crds --check
	$(BIN)/langmerge crds --check --output charts/langmerge/crds

## Everything CI runs: linters, then every test (unit, integration on the real apiserver + S3, trainer, merge, e2e).
test: lint controlplane
	$(BIN)/pytest -p no:cacheprovider --durations=15

test-unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not trainer"

test-integration: controlplane
	$(BIN)/pytest -m integration

## The quality and cost benchmark (experts + merging vs one jointly trained model): results/ (report, JSON, plots).
bench: controlplane
	$(BIN)/langmerge bench --readme README.md

## The engine's speed/memory benchmarks.
bench-engine: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/trainer_throughput.py
	$(BIN)/python benchmarks/ddp_throughput.py
	$(BIN)/python benchmarks/merge_eval_memory.py

clean:
	-$(BIN)/langmerge down
	rm -rf .langmerge .pytest_cache .mypy_cache .ruff_cache
