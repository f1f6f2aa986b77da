"""Operator actions on events: failed-event tools, replay and retention. Every action is logged."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.models import EVENTS_TABLE, SCHEMA

log = logging.getLogger(__name__)

_EVENTS = sql.Identifier(SCHEMA, EVENTS_TABLE)
REPLAY_HEADER = "outbox-replay-of"


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which events an action applies to: ids, a topic, a key, or everything (at least one)."""

    ids: list[int] | None = None
    topic: str | None = None
    key: bytes | None = None
    everything: bool = False

    def where(self) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (("id", self.ids), ("topic", self.topic), ("key", self.key)):
            if value:
                clauses.append(sql.SQL("{} = ANY(%s)" if column == "id" else "{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if not clauses and not self.everything:
            raise ValueError("say which events: ids, a topic, a key, or all")
        return (sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("TRUE")), params

    def describe(self) -> str:
        key = self.key.decode(errors="replace") if self.key else None
        parts = [f"{name}={value}" for name, value in (("ids", self.ids), ("topic", self.topic), ("key", key))
                 if value]
        return " ".join(parts) or "all"


@dataclasses.dataclass(frozen=True)
class ErrorGroup:
    error: str
    count: int
    topics: list[str]
    first_ids: list[int]


def failed_groups(conn: psycopg.Connection[Any], limit: int = 50) -> list[ErrorGroup]:
    """Failed events grouped by their error, the largest group first."""
    query = sql.SQL(
        "SELECT coalesce(last_error, ''), count(*), array_agg(DISTINCT topic), (array_agg(id ORDER BY id))[1:5]"
        " FROM {} WHERE state = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s"
    ).format(_EVENTS)
    rows = conn.execute(query, (limit,))
    return [ErrorGroup(error, count, sorted(topics), ids) for error, count, topics, ids in rows]


def retry_failed(conn: psycopg.Connection[Any], selection: Selection, *, dry_run: bool = False) -> int:
    """Failed events go back to pending with a fresh attempt count."""
    return _change_failed(conn, "state = 'pending', attempts = 0, available_at = now()", "retry", selection, dry_run)


def discard_failed(conn: psycopg.Connection[Any], selection: Selection, *, dry_run: bool = False) -> int:
    """Give up on failed events; they stay as discarded (for the record) until retention removes them."""
    return _change_failed(conn, "state = 'discarded'", "discard", selection, dry_run)


def _change_failed(conn: psycopg.Connection[Any], assignment: str, action: str, selection: Selection,
                   dry_run: bool) -> int:
    where, params = selection.where()
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'failed' AND {}").format(_EVENTS, where)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL("UPDATE {} SET " + assignment + " WHERE state = 'failed' AND {}").format(_EVENTS, where)
    count = conn.execute(query, params).rowcount
    log.warning("operator: %s %d failed events (%s)", action, count, selection.describe(),
                extra={"action": f"failed_{action}", "count": count})
    return count


def replay(conn: psycopg.Connection[Any], selection: Selection, *, since: dt.datetime | None = None,
           until: dt.datetime | None = None, dry_run: bool = False) -> int:
    """Publish already-sent events again, as new events carrying an `outbox-replay-of` header.

    The copies go through the outbox like any event (in order, exactly once each); consumers that
    de-duplicate by `outbox-event-id` see new ids and can tell replays by the header.
    """
    if selection != Selection():
        where, params = selection.where()
    elif since is not None or until is not None:
        where, params = sql.SQL("TRUE"), []
    else:
        raise ValueError("say which events to replay: ids, a topic, a key, all, or a time range")
    window = sql.SQL(
        "sent_at >= coalesce(%s::timestamptz, '-infinity') AND sent_at < coalesce(%s::timestamptz, 'infinity')"
    )
    params += [since, until]
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'sent' AND {} AND {}").format(_EVENTS, where, window)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL(
        "INSERT INTO {events} (topic, key, value, header_names, header_values, partition)"
        " SELECT topic, key, value, header_names || %s::text, header_values || convert_to(event_id::text, 'UTF8')"
        " , partition FROM {events} WHERE state = 'sent' AND {where} AND {window} ORDER BY id"
    ).format(events=_EVENTS, where=where, window=window)
    count = conn.execute(query, [REPLAY_HEADER, *params]).rowcount
    log.warning("operator: replay of %d sent events (%s, since=%s, until=%s)", count, selection.describe(), since,
                until, extra={"action": "replay", "count": count})
    return count


def delete_expired(conn: psycopg.Connection[Any], retention: dt.timedelta, *, batch: int = 1000,
                   budget_s: float = 10.0) -> int:
    """Delete sent and discarded events older than the retention, in small batches (short locks,
    no giant transaction), for at most ``budget_s`` seconds. Returns how many were deleted."""
    deleted = 0
    deadline = time.monotonic() + budget_s
    for state, column in (("sent", "sent_at"), ("discarded", "created_at")):
        query = sql.SQL(
            "DELETE FROM {events} WHERE id IN (SELECT id FROM {events} WHERE state = %s"
            " AND {column} < now() - %s ORDER BY {column} LIMIT %s FOR UPDATE SKIP LOCKED)"
        ).format(events=_EVENTS, column=sql.Identifier(column))
        while time.monotonic() < deadline:
            count = conn.execute(query, (state, retention, batch)).rowcount
            deleted += count
            if count < batch:
                break
    return deleted
