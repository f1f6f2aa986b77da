"""Fixtures against the real services that `scripts/services up` starts (`make test` does it).

Isolation: the outbox schema is migrated once into a template database; every test gets its own
clone (CREATE DATABASE ... TEMPLATE), and its own Kafka topics and transactional ids.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from outbox_relay import migrate
from outbox_relay.store import conninfo
from tests import kafkatools

DATABASE_URL = os.environ.get("OUTBOX_DATABASE_URL", "")
BOOTSTRAP = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "")
TEMPLATE = f"outbox_template_{os.getpid()}"


def _admin() -> psycopg.Connection:
    return psycopg.connect(conninfo(DATABASE_URL), autocommit=True, dbname="postgres")


def url_for(database: str) -> str:
    return make_url(DATABASE_URL).set(database=database).render_as_string(hide_password=False)


def create_database(name: str, template: str | None = None) -> str:
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return url_for(name)


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def services() -> None:
    """Fail loudly (never skip) when the real services are not there."""
    if not DATABASE_URL or not BOOTSTRAP:
        pytest.fail("OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS are not set: run `make test`, "
                    "or `scripts/services up` then `eval \"$(scripts/services env)\"`", pytrace=False)
    try:
        with _admin() as conn:
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
    name = f"outbox_empty_{uuid.uuid4().hex[:12]}"
    yield create_database(name)
    drop_database(name)


@pytest.fixture
def database_url(template_database: str) -> Iterator[str]:
    """A migrated database of this test's own (lane count 1)."""
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    yield create_database(name, template_database)
    drop_database(name)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_pre_ping=True)  # survives the fault tests' restarts
    yield engine
    engine.dispose()


@pytest.fixture
def restores_services() -> Iterator[None]:
    """Whatever a fault test does to the services, they are up again afterwards."""
    yield
    from tests.relaytools import ROOT

    subprocess.run([sys.executable, str(ROOT / "scripts" / "services"), "resume"], capture_output=True)
    for name in ("postgres", "kafka"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "services"), "up", name], check=True,
                       capture_output=True)


@pytest.fixture
def topic(services: None) -> str:
    """A fresh topic with 3 partitions."""
    return kafkatools.create_topic(f"test-{uuid.uuid4().hex[:12]}", partitions=3)
