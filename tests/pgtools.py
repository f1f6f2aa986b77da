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
from outbox_relay.models import (
    EVENTS_TABLE,
    INSTANCES_TABLE,
    LANES_TABLE,
    SCHEMA,
    SENT_TABLE,
    SETTINGS_TABLE,
    STATE_VIEW,
    UNSENT_TABLE,
)

# Qualified names for SQL text (each part is a plain lower-case identifier: models check that at import).
EVENTS = f"{SCHEMA}.{EVENTS_TABLE}"
LANES = f"{SCHEMA}.{LANES_TABLE}"
SETTINGS = f"{SCHEMA}.{SETTINGS_TABLE}"
INSTANCES = f"{SCHEMA}.{INSTANCES_TABLE}"
UNSENT = f"{SCHEMA}.{UNSENT_TABLE}"
SENT = f"{SCHEMA}.{SENT_TABLE}"
EVENT_STATES = f"{SCHEMA}.{STATE_VIEW}"  # each event with its state, attempts, last_error, sent_at


def set_state_sql(state: str, where: str, *, sent_at: str = "now()", last_error: str = "NULL",
                  attempts: int = 0) -> str:
    """One statement that puts the events matching ``where`` (a condition on the events table, aliased
    ``e``) in ``state``, as the relay, an operator or lost writes would have: a sent event leaves the
    unsent table for a batch sent at ``sent_at``; any other state is its unsent row (made again, and
    the event taken out of its batch, when it had been sent)."""
    if state == "sent":
        return (f"WITH d AS (DELETE FROM {UNSENT} u USING {EVENTS} e WHERE e.id = u.id AND ({where}) RETURNING u.id)"
                f" INSERT INTO {SENT} (sent_at, first_id, last_id, ids) SELECT {sent_at}, min(id), max(id),"
                " array_agg(id ORDER BY id) FROM d HAVING count(*) > 0")
    return (f"WITH chosen AS (SELECT e.id, e.lane_key FROM {EVENTS} e WHERE ({where})),"
            f" unbatched AS (UPDATE {SENT} b SET ids = ARRAY(SELECT x FROM unnest(b.ids) x"
            " WHERE x NOT IN (SELECT id FROM chosen)) WHERE b.ids && ARRAY(SELECT id FROM chosen))"
            f" INSERT INTO {UNSENT} (id, lane_key, state, last_error, attempts)"
            f" SELECT id, lane_key, '{state}', {last_error}, {int(attempts)} FROM chosen ON CONFLICT (id) DO UPDATE"
            " SET state = EXCLUDED.state, last_error = EXCLUDED.last_error, attempts = EXCLUDED.attempts")


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
