# `make serve` and `make test` work on a fresh machine with only python3:
# they create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/conveyor serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check conveyor tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) conveyor-data .mypy_cache .ruff_cache

# Long process-level fuzzing of every listener (tests/fuzz/fuzz_run.py): by default
# 1M inputs per listener; ARGS="--minutes 5" bounds the time per listener instead.
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_run.py $(ARGS)
