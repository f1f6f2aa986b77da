"""Test helpers that talk to the real PostgreSQL: scratch databases, and the outbox's configured names.

The names follow OUTBOX_SCHEMA / OUTBOX_TABLE exactly as the relay reads them (outbox_relay.models), so
SQL in tests, bench and scripts says `f"... FROM {EVENTS}"`, never a hard-coded `outbox.events`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
from sqlalchemy.engine import make_url

from outbox_relay.db.connection import conninfo
from outbox_relay.models import EVENTS_TABLE, INSTANCES_TABLE, LANES_TABLE, SCHEMA, SETTINGS_TABLE

# Qualified names for SQL text (each part is a plain lower-case identifier: models check that at import).
EVENTS = f"{SCHEMA}.{EVENTS_TABLE}"
LANES = f"{SCHEMA}.{LANES_TABLE}"
SETTINGS = f"{SCHEMA}.{SETTINGS_TABLE}"
INSTANCES = f"{SCHEMA}.{INSTANCES_TABLE}"


def base_url() -> str:
    return os.environ.get("OUTBOX_DATABASE_URL", "")


def admin() -> psycopg.Connection:
    """An autocommit connection to the server's `postgres` database, for CREATE and DROP DATABASE."""
    return psycopg.connect(conninfo(base_url()), autocommit=True, dbname="postgres")


def url_for(database: str) -> str:
    return make_url(base_url()).set(database=database).render_as_string(hide_password=False)


def create_database(name: str, template: str | None = None) -> str:
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return url_for(name)


def drop_database(name: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_database(prefix: str, template: str | None = None) -> Iterator[str]:
    """The URL of a database of its own (a clone of ``template`` when given), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = create_database(name, template)
    try:
        yield url
    finally:
        drop_database(name)
