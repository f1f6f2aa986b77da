# Two commands do all set-up on a fresh machine: `make demo` (the relay moving real events)
# and `make test` (the full suite against real PostgreSQL and Kafka). Both create what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ENV    := eval "$$($(PY) scripts/services env)"

.PHONY: venv services services-down check unit test verify demo bench bench-peers bench-tick bench-inbox clean

# Strict editable install: a tree of links under build/ that mypy can read too. Links see edits;
# a file added to a package folder changes the folder, which re-links.
$(STAMP): pyproject.toml relay relay/static models alembic alembic/versions alembic/inbox alembic/inbox/versions
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

venv: $(STAMP)

services: venv
	$(PY) scripts/services up

services-down:
	$(PYTHON) scripts/services down

check: venv
	$(VENV)/bin/ruff check relay models alembic tests bench scripts/services scripts/demo.py
	$(VENV)/bin/mypy

# The fast tier: no PostgreSQL, no Kafka, seconds.
unit: venv
	$(PY) -m pytest -q tests/unit

# The fast tier first (a logic error fails in seconds), then everything against the real services.
test: check unit services
	scripts/test-tools
	$(ENV) && $(PY) -m pytest --ignore=tests/unit -m "not verify_only" $(PYTEST_ARGS)

# The reliability suite at full size (2-minute load) against the local services, and every fault
# scenario on the 3-broker cluster and the PostgreSQL standby (the tests start those themselves).
verify: check services
	scripts/test-tools
	$(ENV) && OUTBOX_LOAD_SECONDS=120 OUTBOX_SCENARIO_SIZE=full $(PY) -m pytest -s tests/test_reliability.py \
		tests/test_faults.py tests/test_exactly_once.py tests/test_cluster.py tests/test_standby.py $(PYTEST_ARGS)

demo: services
	$(ENV) && $(PY) scripts/demo.py

# PostgreSQL with production durability (its own cluster: `scripts/services up bench`), Debezium beside
# the relay (jars from Maven Central, first run only). Takes over an hour at full size; for a quicker look:
# BENCH_ARGS="--events 100000 --repeats 2 --scale-rows 1000000 --retention-per-day 30000 --retention-days 8 --retention-day-seconds 20"
BENCH_ENV := eval "$$($(PY) scripts/services env bench)"

bench: services
	$(PY) scripts/services up bench
	$(BENCH_ENV) && $(PY) bench/bench.py $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-tick bench-inbox

# One lane's tick, stage by stage (claim / Kafka / mark), serial beside overlapped; and the claim behind
# delayed events before and after the ready lane indexes (0008).
bench-tick: services
	$(PY) scripts/services up bench
	$(BENCH_ENV) && $(PY) bench/tick_profile.py --keep-durability $(TICK_ARGS)

# The consumer inbox beside a bare consumer that commits offsets, on the same topic.
bench-inbox: services
	$(PY) scripts/services up bench
	$(BENCH_ENV) && $(PY) bench/inbox_bench.py $(INBOX_BENCH_ARGS)

# Only the side-by-side with Debezium: the drain (with the ceilings) and the latency runs.
bench-peers: services
	$(PY) scripts/services up bench
	$(BENCH_ENV) && $(PY) bench/bench.py --only drain latency peers $(BENCH_ARGS)

clean: services-down
	rm -rf $(VENV) .services
