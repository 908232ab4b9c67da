# Every target creates the virtualenv first when it is missing, so that a fresh
# clone can run `make test` or `make demo` as its very first command.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-unit lint format typecheck bench chaos demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# constraints.txt pins every dependency to the versions CI is green with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with every extra and the dev tools

# The tiers: tests/unit (no Redis), tests/redis (real Redis, in process),
# tests/processes (real processes, browsers, compose), tests/cluster (a 3-master
# Redis Cluster the session starts from redis-server).
test: $(STAMP) lint typecheck ## every tier: lint, typecheck, unit, redis, processes, cluster (Redis at REDIS_URL)
	$(BIN)/python -m pytest -q tests/unit tests/redis tests/processes tests/cluster $(ARGS)

test-unit: $(STAMP) ## tests/unit only: no Redis, seconds
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check bus workers tests bench examples
	$(BIN)/ruff format --check bus workers tests bench examples

format: $(STAMP) ## apply ruff formatting and fixes
	$(BIN)/ruff format bus workers tests bench examples
	$(BIN)/ruff check --fix bus workers tests bench examples

typecheck: $(STAMP) ## mypy --strict on bus/ and workers/
	$(BIN)/mypy

bench: $(STAMP) ## run every benchmark (each prints a JSON line last)
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.openai_overhead
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.consume
	$(BIN)/python -m bench.fanout_worker
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.clients
	$(BIN)/python -m bench.traces
	$(BIN)/python -m bench.webhooks
	$(BIN)/python -m bench.cluster
	$(BIN)/python -m bench.embedded

chaos: $(STAMP) ## fault scenarios at size (owned Redis, 3 replicas per worker); prints losses as JSON
	$(BIN)/python -m bench.chaos $(ARGS)

demo: $(STAMP) ## run the demo (embedded Redis unless REDIS_URL is set)
	$(BIN)/python -m bus.demo $(ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
