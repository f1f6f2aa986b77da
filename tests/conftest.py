"""Fixtures against the real services that `scripts/services up` starts (`make test` does it).

Isolation: the outbox schema is migrated once into a template database; every test gets its own
clone (CREATE DATABASE ... TEMPLATE), and its own Kafka topics and transactional ids. Relay
processes come from the `relays` fixture, which stops every one when the test ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine

from outbox_relay import migrate
from tests import kafkatools
from tests.pgtools import admin, create_database, drop_database, scratch_database
from tests.relaytools import STARTED, RelayDidNotStop, Relays, service, stop_every

DATABASE_URL = os.environ.get("OUTBOX_DATABASE_URL", "")
BOOTSTRAP = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "")
TEMPLATE = f"outbox_template_{os.getpid()}"
GAVE_UP = "relay exited through its shutdown deadline"


@pytest.fixture(scope="session")
def services() -> None:
    """Fail loudly (never skip) when the real services are not there."""
    if not DATABASE_URL or not BOOTSTRAP:
        pytest.fail("OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS are not set: run `make test`, "
                    "or `scripts/services up` then `eval \"$(scripts/services env)\"`", pytrace=False)
    try:
        with admin() as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {DATABASE_URL} is not reachable: {exc}", pytrace=False)
    try:
        kafkatools.admin().list_topics(timeout=10)
    except Exception as exc:
        pytest.fail(f"Kafka at {BOOTSTRAP} is not reachable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def template_database(services: None) -> Iterator[str]:
    drop_database(TEMPLATE)
    migrate.upgrade(create_database(TEMPLATE), lanes=1)
    yield TEMPLATE
    drop_database(TEMPLATE)


@pytest.fixture
def empty_database_url(services: None) -> Iterator[str]:
    with scratch_database("outbox_empty") as url:
        yield url


@pytest.fixture
def database_url(template_database: str) -> Iterator[str]:
    """A migrated database of this test's own (lane count 1)."""
    with scratch_database("outbox_test", template_database) as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_pre_ping=True)  # survives the fault tests' restarts
    yield engine
    engine.dispose()


@pytest.fixture
def restores_services() -> Iterator[None]:
    """Whatever a fault test does to the services, they are up again afterwards."""
    yield
    service("resume", check=False)
    for name in ("postgres", "kafka"):
        service("up", name)


@pytest.fixture
def topic(services: None) -> str:
    """A fresh topic with 3 partitions."""
    return kafkatools.create_topic(f"test-{uuid.uuid4().hex[:12]}", partitions=3)


@pytest.fixture
def relays(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Relays]:
    """Starts relay processes (`relays.start(database_url, name, **settings)`), logs in tmp_path.

    At teardown, whatever the test did, every relay still running gets SIGTERM and is waited for within
    its shutdown bound; one that overruns is killed (never left to the next test) and fails the test.
    So does one that exited through its own shutdown deadline instead of finishing its stop (issue 11,
    item 15: a shutdown stays within its bound whatever state the broker is in). Request it after the
    database fixtures, so that relays stop before their database is dropped.
    """
    started = Relays(tmp_path)
    yield started
    try:
        started.stop_all()
    except RelayDidNotStop as exc:
        pytest.fail(str(exc), pytrace=False)
    gave_up = [relay for relay in started.started if relay.gave_up]
    if gave_up:
        request.node.user_properties += [(GAVE_UP, relay.name) for relay in gave_up]
        pytest.fail("\n\n".join(f"relay {relay.name} exited through its shutdown deadline:\n{relay.log()[-4000:]}"
                                 for relay in gave_up), pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Shutdowns that needed the relay's own deadline, listed once more at the end of the run."""
    lines = [f"{report.nodeid}: {name}" for reports in terminalreporter.stats.values() for report in reports
             if isinstance(report, pytest.TestReport) and report.when == "teardown"
             for key, name in report.user_properties if key == GAVE_UP]
    if lines:
        terminalreporter.section("relays that exited through their shutdown deadline (OUTBOX_SHUTDOWN_TIMEOUT)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _no_relay_outlives_its_test() -> Iterator[None]:
    """The safety net under `relays`: a relay started any other way and left running is stopped, and fails."""
    yield
    strays = [relay for relay in STARTED if relay.alive]
    problems = stop_every(strays)
    STARTED.clear()
    if strays:
        pytest.fail(f"relays left running by the test: {[relay.name for relay in strays]} (start them with the"
                    " `relays` fixture, which stops them)" + "".join(f"\n\n{p}" for p in problems), pytrace=False)
