"""Operator actions on events: failed-event tools, replay and retention. Every action is logged."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.models import EVENTS_TABLE, SCHEMA

log = logging.getLogger(__name__)

_EVENTS = sql.Identifier(SCHEMA, EVENTS_TABLE)
REPLAY_HEADER = "outbox-replay-of"


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which events an action applies to: row ids, event ids, a topic, a key, or everything (at least one).

    Row ids and event ids (the UUID that logs and the outbox-event-id header carry) together select
    the events that have either."""

    ids: list[int] | None = None
    topic: str | None = None
    key: bytes | None = None
    everything: bool = False
    event_ids: list[uuid.UUID] | None = None

    def where(self) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if self.ids and self.event_ids:
            clauses.append(sql.SQL("(id = ANY(%s) OR event_id = ANY(%s))"))
            params += [self.ids, self.event_ids]
        for column, value in (("id", None if self.event_ids else self.ids),
                              ("event_id", None if self.ids else self.event_ids),
                              ("topic", self.topic), ("key", self.key)):
            if value:
                clauses.append(sql.SQL("{} = ANY(%s)" if column in ("id", "event_id") else "{} = %s").format(
                    sql.Identifier(column)))
                params.append(value)
        if not clauses and not self.everything:
            raise ValueError("say which events: ids, a topic, a key, or all")
        return (sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("TRUE")), params

    def describe(self) -> str:
        key = self.key.decode(errors="replace") if self.key else None
        event_ids = [str(e) for e in self.event_ids] if self.event_ids else None
        parts = [f"{name}={value}" for name, value in (("ids", self.ids), ("event_ids", event_ids),
                                                      ("topic", self.topic), ("key", key)) if value]
        return " ".join(parts) or "all"


@dataclasses.dataclass(frozen=True)
class ErrorGroup:
    error: str
    count: int
    topics: list[str]
    first_ids: list[int]
    first_event_ids: list[str]
    keys: list[str]  # the first few failed keys, as text (what `--key` takes); undecodable bytes escaped
    key_count: int  # distinct keys of the group (keyless events hold nothing)
    held: int  # pending events waiting behind this group's failed events of their key


def key_text(key: bytes) -> str:
    return key.decode(errors="backslashreplace")


def failed_groups(conn: psycopg.Connection[Any], limit: int = 50) -> list[ErrorGroup]:
    """Failed events grouped by their error, the largest group first, with the keys they hold."""
    query = sql.SQL(
        "WITH g AS (SELECT coalesce(last_error, '') AS error, count(*) AS n, array_agg(DISTINCT topic) AS topics,"
        " (array_agg(id ORDER BY id))[1:5] AS ids, (array_agg(event_id::text ORDER BY id))[1:5] AS event_ids,"
        " (array_agg(DISTINCT key) FILTER (WHERE key IS NOT NULL))[1:5] AS keys,"
        " count(DISTINCT key) AS key_count FROM {events} WHERE state = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1"
        " LIMIT %s),"
        " f AS (SELECT coalesce(last_error, '') AS error, key, min(id) AS first FROM {events}"
        " WHERE state = 'failed' AND key IS NOT NULL GROUP BY 1, 2),"
        " h AS (SELECT f.error, count(*) AS held FROM f JOIN {events} p ON p.state = 'pending' AND p.key = f.key"
        " AND p.id > f.first GROUP BY 1)"
        " SELECT g.error, g.n, g.topics, g.ids, g.event_ids, coalesce(g.keys, '{{}}'), g.key_count,"
        " coalesce(h.held, 0) FROM g LEFT JOIN h ON h.error = g.error ORDER BY g.n DESC, g.error"
    ).format(events=_EVENTS)
    rows = conn.execute(query, (limit,))
    return [ErrorGroup(error, count, sorted(topics), ids, event_ids, [key_text(k) for k in keys], key_count, held)
            for error, count, topics, ids, event_ids, keys, key_count, held in rows]


def render_group(group: ErrorGroup) -> str:
    """A group of `outbox-relay failed list`: how many, where, which keys, what waits behind them."""
    more = f" (+{group.key_count - len(group.keys)} more)" if group.key_count > len(group.keys) else ""
    keys = f"  keys: {', '.join(repr(k) for k in group.keys)}{more}" if group.keys else "  keys: (none)"
    held = f"  holding {group.held} pending" if group.held else ""
    return (f"{group.count:>7} failed  topics: {', '.join(group.topics)}{keys}{held}\n"
            f"        first ids: {', '.join(f'{i} ({e})' for i, e in zip(group.first_ids, group.first_event_ids))}"
            f"\n        {group.error}")


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
