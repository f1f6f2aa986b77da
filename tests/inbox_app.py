"""A consumer application for the inbox tests: one effect row per event and a counter per key.

The effect row records the key's counter at the moment the event was applied, so the order in which
a key's events were applied can be compared with the outbox's id order. An event whose value says
``{"poison": true}`` fails until its id is listed in ``app.cured`` (an operator's fix).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outbox_relay import InboxEvent

SCHEMA_SQL = [
    "CREATE SCHEMA IF NOT EXISTS app",
    "CREATE TABLE app.effects (event_id uuid NOT NULL, key text, n integer NOT NULL, topic text NOT NULL,"
    " partition integer NOT NULL, kafka_offset bigint NOT NULL, body jsonb, applied_at timestamptz DEFAULT now())",
    "CREATE TABLE app.counters (key text PRIMARY KEY, n integer NOT NULL)",
    "CREATE TABLE app.cured (event_id uuid PRIMARY KEY)",
    # Notes are indexed: a note too long for a btree entry is an event PostgreSQL refuses (program limit).
    "CREATE TABLE app.notes (body text NOT NULL)",
    "CREATE INDEX ON app.notes (body)",
]

_COUNT = text("INSERT INTO app.counters AS c (key, n) VALUES (:key, 1) ON CONFLICT (key) DO UPDATE SET n = c.n + 1"
              " RETURNING n")
_EFFECT = text("INSERT INTO app.effects (event_id, key, n, topic, partition, kafka_offset, body)"
               " VALUES (:event_id, :key, :n, :topic, :partition, :offset, CAST(:body AS jsonb))")
_CURED = text("SELECT 1 FROM app.cured WHERE event_id = :event_id")


class Poisoned(Exception):
    """This event cannot be applied until an operator cures it."""


def create_schema(conn: Connection) -> None:
    for statement in SCHEMA_SQL:
        conn.execute(text(statement))


def _params(event: InboxEvent, n: int) -> dict[str, Any]:
    import json

    return {"event_id": event.event_id, "key": event.key.decode() if event.key is not None else None, "n": n,
            "topic": event.topic, "partition": event.partition, "offset": event.offset,
            "body": json.dumps(event.value)}


def _poison(event: InboxEvent) -> bool:
    return isinstance(event.value, dict) and bool(event.value.get("poison"))


def apply(event: InboxEvent, session: Session) -> None:
    if _poison(event) and session.execute(_CURED, {"event_id": event.event_id}).first() is None:
        raise Poisoned(f"event {event.event_id} is poison")
    key = event.key.decode() if event.key is not None else ""
    n = session.execute(_COUNT, {"key": key}).scalar_one()
    session.execute(_EFFECT, _params(event, n))


def apply_noted(event: InboxEvent, session: Session) -> None:
    """``apply``, and the event's ``note`` (if any) into the indexed notes table."""
    note = event.value.get("note") if isinstance(event.value, dict) else None
    if note is not None:
        session.execute(text("INSERT INTO app.notes (body) VALUES (:body)"), {"body": note})
    apply(event, session)


async def apply_async(event: InboxEvent, session: AsyncSession) -> None:
    if _poison(event) and (await session.execute(_CURED, {"event_id": event.event_id})).first() is None:
        raise Poisoned(f"event {event.event_id} is poison")
    key = event.key.decode() if event.key is not None else ""
    n = (await session.execute(_COUNT, {"key": key})).scalar_one()
    await session.execute(_EFFECT, _params(event, n))
