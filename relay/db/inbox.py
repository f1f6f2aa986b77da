"""The consumer inbox's SQL: every statement the inbox runs against the consumer's database.

Functions that take a ``Session`` run inside the transaction of the handler's effects, so the
processed ids, the stored offsets and the effects commit (or roll back) together.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox_relay.db.connection import translated, where
from outbox_relay.errors import SchemaError
from outbox_relay.models.inbox import INBOX_SCHEMA, OFFSETS_TABLE, PARKED_TABLE, PROCESSED_TABLE

PROCESSED = f'"{INBOX_SCHEMA}"."{PROCESSED_TABLE}"'
OFFSETS = f'"{INBOX_SCHEMA}"."{OFFSETS_TABLE}"'
PARKED = f'"{INBOX_SCHEMA}"."{PARKED_TABLE}"'

Target = Session | Connection
Position = tuple[str, int]  # (topic, partition)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One event to record as processed: its de-duplication id and where it was read."""

    event_id: uuid.UUID
    topic: str
    partition: int
    offset: int


@dataclasses.dataclass(frozen=True)
class ParkedRow:
    id: int
    topic: str
    partition: int
    offset: int
    event_id: uuid.UUID
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None
    state: str
    attempts: int
    error: str | None
    parked_at: dt.datetime | None = None


def claim(target: Target, group: str, claims: Sequence[Claim]) -> set[uuid.UUID]:
    """Record ``claims`` as processed; returns the ids that were new (the others are duplicates).

    A concurrent consumer recording the same id (a zombie after a rebalance) makes this wait for its
    transaction: its commit turns ours into a duplicate, its rollback lets ours through.
    """
    if not claims:
        return set()
    rows = target.execute(text(
        f"INSERT INTO {PROCESSED} (consumer_group, event_id, topic, partition, \"offset\")"
        " SELECT :group, e, t, p, o FROM unnest(CAST(:ids AS uuid[]), CAST(:topics AS text[]),"
        " CAST(:partitions AS integer[]), CAST(:offsets AS bigint[])) AS u(e, t, p, o)"
        " ON CONFLICT DO NOTHING RETURNING event_id"
    ), {"group": group, "ids": [c.event_id for c in claims], "topics": [c.topic for c in claims],
        "partitions": [c.partition for c in claims], "offsets": [c.offset for c in claims]})
    return {row[0] for row in rows}


def advance(target: Target, group: str, positions: dict[Position, int]) -> None:
    """Store the next offset to read per partition; never moves one back (a zombie may write late)."""
    if not positions:
        return
    items = sorted(positions.items())
    target.execute(text(
        f"INSERT INTO {OFFSETS} AS o (consumer_group, topic, partition, next_offset)"
        " SELECT :group, t, p, n FROM unnest(CAST(:topics AS text[]), CAST(:partitions AS integer[]),"
        " CAST(:nexts AS bigint[])) AS u(t, p, n)"
        " ON CONFLICT (consumer_group, topic, partition) DO UPDATE"
        " SET next_offset = greatest(o.next_offset, excluded.next_offset), updated_at = now()"
    ), {"group": group, "topics": [t for (t, _), _ in items], "partitions": [p for (_, p), _ in items],
        "nexts": [n for _, n in items]})


def stored_offsets(target: Target, group: str, positions: Iterable[Position]) -> dict[Position, int]:
    wanted = list(positions)
    if not wanted:
        return {}
    rows = target.execute(text(
        f"SELECT topic, partition, next_offset FROM {OFFSETS} WHERE consumer_group = :group"
        " AND (topic, partition) IN (SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:partitions AS integer[])))"
    ), {"group": group, "topics": [t for t, _ in wanted], "partitions": [p for _, p in wanted]})
    return {(row[0], row[1]): int(row[2]) for row in rows}


def park(target: Target, group: str, row: ParkedRow) -> None:
    """Park one event (failed, or held behind a failed one of its key); a second park of the same
    position (a zombie's) changes nothing."""
    target.execute(text(
        f"INSERT INTO {PARKED} (consumer_group, topic, partition, \"offset\", event_id, key, value, header_names,"
        " header_values, timestamp_ms, state, attempts, error)"
        " VALUES (:group, :topic, :partition, :offset, :event_id, :key, :value, :names, :values, :ts, :state,"
        " :attempts, :error) ON CONFLICT (consumer_group, topic, partition, \"offset\") DO NOTHING"
    ), {"group": group, "topic": row.topic, "partition": row.partition, "offset": row.offset,
        "event_id": row.event_id, "key": row.key, "value": row.value, "names": [n for n, _ in row.headers],
        "values": [v for _, v in row.headers], "ts": row.timestamp_ms, "state": row.state,
        "attempts": row.attempts, "error": row.error})


def parked_keys(target: Target, group: str, position: Position) -> set[bytes]:
    """Keys of a partition with parked events: under the hold policy, their later events wait too."""
    rows = target.execute(text(
        f"SELECT DISTINCT key FROM {PARKED} WHERE consumer_group = :group AND topic = :topic"
        " AND partition = :partition AND key IS NOT NULL"
    ), {"group": group, "topic": position[0], "partition": position[1]})
    return {bytes(row[0]) for row in rows}


_PARKED_COLUMNS = ("id, topic, partition, \"offset\", event_id, key, value, header_names, header_values,"
                   " timestamp_ms, state, attempts, error, parked_at")


def _parked(row: Any) -> ParkedRow:
    return ParkedRow(row[0], row[1], row[2], row[3], row[4], None if row[5] is None else bytes(row[5]),
                     None if row[6] is None else bytes(row[6]),
                     tuple(zip(row[7], (bytes(v) for v in row[8]))), row[9], row[10], row[11], row[12], row[13])


def ready_parked(target: Target, group: str, positions: Iterable[Position], limit: int) -> list[ParkedRow]:
    """Parked events to try again now: the head of each key's queue, unless it is failed.

    An operator's retry makes a failed head ready; a discard removes it, so the events held behind
    it become heads. Keyless events hold nothing, so each is its own queue.
    """
    wanted = list(positions)
    if not wanted:
        return []
    rows = target.execute(text(
        f"SELECT {_PARKED_COLUMNS} FROM {PARKED} p WHERE consumer_group = :group AND state <> 'failed'"
        " AND (topic, partition) IN (SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:partitions AS integer[])))"
        f" AND NOT EXISTS (SELECT 1 FROM {PARKED} q WHERE q.consumer_group = p.consumer_group"
        " AND q.topic = p.topic AND q.partition = p.partition AND q.key = p.key AND q.\"offset\" < p.\"offset\")"
        " ORDER BY topic, partition, \"offset\" LIMIT :limit"
    ), {"group": group, "topics": [t for t, _ in wanted], "partitions": [p for _, p in wanted], "limit": limit})
    return [_parked(row) for row in rows]


def unpark(target: Target, parked_id: int) -> None:
    target.execute(text(f"DELETE FROM {PARKED} WHERE id = :id"), {"id": parked_id})


def fail_again(target: Target, parked_id: int, error: str, attempts: int) -> None:
    target.execute(text(
        f"UPDATE {PARKED} SET state = 'failed', error = :error, attempts = attempts + :attempts WHERE id = :id"
    ), {"id": parked_id, "error": error, "attempts": attempts})


def delete_processed(target: Connection, group: str | None, retention: dt.timedelta, batch: int = 1000) -> int:
    """Delete one batch of processed ids older than the retention; returns how many."""
    result = target.execute(text(
        f"DELETE FROM {PROCESSED} WHERE (consumer_group, event_id) IN (SELECT consumer_group, event_id"
        f" FROM {PROCESSED} WHERE processed_at < now() - CAST(:retention AS interval)"
        " AND (CAST(:group AS text) IS NULL OR consumer_group = :group)"
        " ORDER BY processed_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
    ), {"group": group, "retention": retention, "batch": batch})
    return int(result.rowcount)


# Operators' tools (outbox-relay inbox failed ...), each in its own short transaction.

@dataclasses.dataclass(frozen=True)
class ParkedSelection:
    group: str | None = None
    ids: tuple[int, ...] = ()
    event_ids: tuple[uuid.UUID, ...] = ()
    topic: str | None = None
    key: bytes | None = None
    everything: bool = False

    def where(self) -> tuple[str, dict[str, Any]]:
        if not (self.ids or self.event_ids or self.topic or self.key is not None or self.everything):
            raise ValueError("say which parked events: --id, --topic, --key or --all")
        clauses: list[str] = ["TRUE"]
        params: dict[str, Any] = {}
        if self.group:
            clauses.append("consumer_group = :group")
            params["group"] = self.group
        if self.ids or self.event_ids:
            clauses.append("(id = ANY(CAST(:ids AS bigint[])) OR event_id = ANY(CAST(:event_ids AS uuid[])))")
            params.update(ids=list(self.ids), event_ids=list(self.event_ids))
        if self.topic:
            clauses.append("topic = :topic")
            params["topic"] = self.topic
        if self.key is not None:
            clauses.append("key = :key")
            params["key"] = self.key
        return " AND ".join(clauses), params


def list_parked(target: Target, group: str | None) -> list[tuple[str, ParkedRow]]:
    rows = target.execute(text(
        f"SELECT consumer_group, {_PARKED_COLUMNS} FROM {PARKED}"
        " WHERE CAST(:group AS text) IS NULL OR consumer_group = :group"
        " ORDER BY consumer_group, topic, partition, \"offset\""
    ), {"group": group})
    return [(row[0], _parked(row[1:])) for row in rows]


def retry_parked(target: Target, selection: ParkedSelection, *, dry_run: bool = False) -> int:
    """Failed events back to the consumer: it tries them again, in order, ahead of what their key holds."""
    where, params = selection.where()
    if dry_run:
        return int(target.execute(text(f"SELECT count(*) FROM {PARKED} WHERE state = 'failed' AND {where}"),
                                  params).scalar_one())
    result: Any = target.execute(text(f"UPDATE {PARKED} SET state = 'retry' WHERE state = 'failed' AND {where}"),
                                 params)
    return int(result.rowcount)


def discard_parked(target: Target, selection: ParkedSelection, *, dry_run: bool = False) -> int:
    """Give up on failed events: they are deleted unapplied; events held behind them go on."""
    where, params = selection.where()
    if dry_run:
        return int(target.execute(text(f"SELECT count(*) FROM {PARKED} WHERE state = 'failed' AND {where}"),
                                  params).scalar_one())
    result: Any = target.execute(text(f"DELETE FROM {PARKED} WHERE state = 'failed' AND {where}"), params)
    return int(result.rowcount)


def status(target: Target, group: str | None) -> list[dict[str, Any]]:
    """Per group, topic and partition: the stored offset, parked counts by state, and the last update."""
    rows = target.execute(text(
        f"SELECT o.consumer_group, o.topic, o.partition, o.next_offset, o.updated_at,"
        f" (SELECT count(*) FROM {PARKED} p WHERE p.consumer_group = o.consumer_group AND p.topic = o.topic"
        "   AND p.partition = o.partition AND p.state = 'failed'),"
        f" (SELECT count(*) FROM {PARKED} p WHERE p.consumer_group = o.consumer_group AND p.topic = o.topic"
        "   AND p.partition = o.partition AND p.state <> 'failed')"
        f" FROM {OFFSETS} o WHERE CAST(:group AS text) IS NULL OR o.consumer_group = :group"
        " ORDER BY 1, 2, 3"
    ), {"group": group})
    return [{"group": r[0], "topic": r[1], "partition": r[2], "next_offset": r[3],
             "updated_at": r[4].isoformat() if r[4] else None, "failed": r[5], "waiting": r[6]} for r in rows]


def open_engine(database_url: str, *, check_schema: bool = True) -> Engine:
    """An engine whose first connection worked and (with ``check_schema``) whose inbox tables exist."""
    engine = create_engine(database_url, connect_args={"connect_timeout": 5})
    doing = f"cannot connect to PostgreSQL at {where(database_url)}"
    with translated(doing), engine.connect() as conn:
        if not check_schema:
            return engine
        missing = [table for table in (PROCESSED_TABLE, OFFSETS_TABLE, PARKED_TABLE)
                   if conn.execute(text("SELECT to_regclass(:name)"),
                                   {"name": f'"{INBOX_SCHEMA}"."{table}"'}).scalar() is None]
    if missing:
        raise SchemaError(f"the inbox tables are missing at {where(database_url)} ({', '.join(missing)}): run "
                          "`outbox-relay inbox migrate` (or call outbox_relay.models.inbox_migration."
                          "create_inbox_v1 from your own Alembic history)")
    return engine
