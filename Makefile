# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit build bench bench-kafka clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall (and so rebuild the extension) whenever the build inputs change.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard src/mqfast/*.pyx src/mqfast/*.pxd)
	$(BIN)/python -m pip install --quiet "Cython==3.3.1" "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

build: $(STAMP)

# No variable is set here: the environment's MESSAGE_QUEUE_* (the contract's) always win, and
# mqfast's own defaults (port 8087) apply when none is set.
run: $(STAMP)
	$(BIN)/mqfast serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run.py

# The Kafka engine against a local Kafka, PostgreSQL and Redis (started and stopped by it).
bench-kafka: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/kafka.py

clean:
	rm -rf build src/mqfast/_core.c src/mqfast/*.so $(VENV)
