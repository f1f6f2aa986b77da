"""The operators' queries: failed events (list, retry, discard), replay, and the ledger read."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS
from outbox_relay.verify import LedgerRow


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


_FAILED_GROUPS = sql.SQL(
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
).format(events=EVENTS)
# What an action does to the failed events it selects.
FAILED_CHANGES = {
    "retry": sql.SQL("state = 'pending', attempts = 0, available_at = now()"),
    "discard": sql.SQL("state = 'discarded'"),
}
_WINDOW = sql.SQL(
    "sent_at >= coalesce(%s::timestamptz, '-infinity') AND sent_at < coalesce(%s::timestamptz, 'infinity')"
)


@translated()
def failed_groups(conn: Connection, limit: int) -> list[tuple[Any, ...]]:
    """Failed events grouped by error, the largest group first: (error, count, topics, first ids,
    first event ids, first keys, key count, pending events held behind the group's keys)."""
    return conn.execute(_FAILED_GROUPS, (limit,)).fetchall()


@translated()
def change_failed(conn: Connection, action: str, selection: Selection, *, dry_run: bool) -> int:
    """Apply ``action`` (a key of FAILED_CHANGES) to the selected failed events; how many (would) change."""
    where, params = selection.where()
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'failed' AND {}").format(EVENTS, where)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL("UPDATE {} SET {} WHERE state = 'failed' AND {}").format(EVENTS, FAILED_CHANGES[action], where)
    return conn.execute(query, params).rowcount


@translated()
def replay(conn: Connection, selection: Selection | None, since: dt.datetime | None, until: dt.datetime | None,
           header: str, *, dry_run: bool) -> int:
    """Copy the sent events that match (None: every one sent in the window) as new events with ``header``
    naming the original; how many (would)."""
    where, params = selection.where() if selection is not None else (sql.SQL("TRUE"), [])
    params = [*params, since, until]
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'sent' AND {} AND {}").format(EVENTS, where, _WINDOW)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL(
        "INSERT INTO {events} (topic, key, value, header_names, header_values, partition)"
        " SELECT topic, key, value, header_names || %s::text, header_values || convert_to(event_id::text, 'UTF8')"
        " , partition FROM {events} WHERE state = 'sent' AND {where} AND {window} ORDER BY id"
    ).format(events=EVENTS, where=where, window=_WINDOW)
    return conn.execute(query, [header, *params]).rowcount


@translated()
def ledger_rows(conn: Connection) -> list[LedgerRow]:
    """Every row of the outbox table (all states), in id order: what `outbox-relay verify` compares."""
    query = sql.SQL("SELECT id, event_id::text, topic, key, state FROM {} ORDER BY id").format(EVENTS)
    return [LedgerRow(*row) for row in conn.execute(query)]
