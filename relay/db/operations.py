"""The operators' queries: failed events (list, retry, discard), replay, and the ledger read."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS, SENT, UNSENT
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
        """The condition on the events table, aliased ``e``, and its parameters."""
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if self.ids and self.event_ids:
            clauses.append(sql.SQL("(e.id = ANY(%s) OR e.event_id = ANY(%s))"))
            params += [self.ids, self.event_ids]
        for column, value in (("id", None if self.event_ids else self.ids),
                              ("event_id", None if self.ids else self.event_ids),
                              ("topic", self.topic), ("key", self.key)):
            if value:
                clauses.append(sql.SQL("{} = ANY(%s)" if column in ("id", "event_id") else "{} = %s").format(
                    sql.Identifier("e", column)))
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


_FAILED = sql.SQL("{unsent} u JOIN {events} e ON e.id = u.id").format(unsent=UNSENT, events=EVENTS)
_FAILED_GROUPS = sql.SQL(
    "WITH g AS (SELECT coalesce(u.last_error, '') AS error, count(*) AS n, array_agg(DISTINCT e.topic) AS topics,"
    " (array_agg(e.id ORDER BY e.id))[1:5] AS ids, (array_agg(e.event_id::text ORDER BY e.id))[1:5] AS event_ids,"
    " (array_agg(DISTINCT e.key) FILTER (WHERE e.key IS NOT NULL))[1:5] AS keys,"
    " count(DISTINCT e.key) AS key_count FROM {failed} WHERE u.state = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1"
    " LIMIT %s),"
    " f AS (SELECT coalesce(u.last_error, '') AS error, e.key, min(e.id) AS first FROM {failed}"
    " WHERE u.state = 'failed' AND e.key IS NOT NULL GROUP BY 1, 2),"
    " h AS (SELECT f.error, count(*) AS held FROM f JOIN {events} p ON p.key = f.key AND p.id > f.first"
    " JOIN {unsent} pu ON pu.id = p.id AND pu.state = 'pending' GROUP BY 1)"
    " SELECT g.error, g.n, g.topics, g.ids, g.event_ids, coalesce(g.keys, '{{}}'), g.key_count,"
    " coalesce(h.held, 0) FROM g LEFT JOIN h ON h.error = g.error ORDER BY g.n DESC, g.error"
).format(failed=_FAILED, events=EVENTS, unsent=UNSENT)
# What an action does to the failed events it selects (their unsent rows).
FAILED_CHANGES = {
    # Due as it was written (back in the ready index, in id order ahead of what its key held): a due
    # time of now() would make it a delayed event, claimed after other delayed events due earlier.
    "retry": sql.SQL("state = 'pending', attempts = 0, due_at = NULL"),
    "discard": sql.SQL("state = 'discarded'"),
}
# Sent events, two ways. Selected events (ids, a topic, a key) are each looked up in the batch
# whose id range holds them (a GiST index on the ranges); everything sent in a window is read
# from the window's batches instead.
_BATCH_IN_WINDOW = ("b.sent_at >= coalesce(%s::timestamptz, '-infinity')"
                    " AND b.sent_at < coalesce(%s::timestamptz, 'infinity')")
_SENT_SELECTED = sql.SQL(
    "{events} e WHERE EXISTS (SELECT 1 FROM {sent} b WHERE int8range(b.first_id, b.last_id, '[]') @> e.id"
    " AND e.id = ANY(b.ids) AND " + _BATCH_IN_WINDOW + ") AND "
).format(events=EVENTS, sent=SENT)
_SENT_IN_WINDOW = sql.SQL(
    "(SELECT unnest(b.ids) AS id FROM {sent} b WHERE " + _BATCH_IN_WINDOW + ") s JOIN {events} e ON e.id = s.id WHERE "
).format(sent=SENT, events=EVENTS)


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
        query = sql.SQL("SELECT count(*) FROM {} WHERE u.state = 'failed' AND {}").format(_FAILED, where)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL("UPDATE {unsent} u SET {change} FROM {events} e"
                    " WHERE e.id = u.id AND u.state = 'failed' AND {where}").format(
        unsent=UNSENT, change=FAILED_CHANGES[action], events=EVENTS, where=where)
    return conn.execute(query, params).rowcount


@translated()
def replay(conn: Connection, selection: Selection | None, since: dt.datetime | None, until: dt.datetime | None,
           header: str, *, dry_run: bool) -> int:
    """Copy the sent events that match (None: every one sent in the window) as new events with ``header``
    naming the original; how many (would)."""
    selected = selection is not None and not selection.everything
    where, params = selection.where() if selection is not None else (sql.SQL("TRUE"), [])
    params = [since, until, *params]
    sent = _SENT_SELECTED if selected else _SENT_IN_WINDOW
    if dry_run:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}{}").format(sent, where), params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL(
        "INSERT INTO {events} (topic, key, value, header_names, header_values, partition)"
        " SELECT e.topic, e.key, e.value, e.header_names || %s::text,"
        " e.header_values || convert_to(e.event_id::text, 'UTF8'), e.partition FROM {sent}{where} ORDER BY e.id"
    ).format(events=EVENTS, sent=sent, where=where)
    return conn.execute(query, [header, *params]).rowcount


@translated()
def ledger_rows(conn: Connection, event_ids: list[uuid.UUID] | None = None) -> list[LedgerRow]:
    """Every row of the outbox table (all states), or those of ``event_ids``, in id order: what
    `outbox-relay verify` compares."""
    query = sql.SQL(
        "SELECT e.id, e.event_id::text, e.topic, e.key, coalesce(u.state, 'sent'), e.created_at FROM {events} e"
        " LEFT JOIN {unsent} u ON u.id = e.id {only} ORDER BY e.id"
    ).format(events=EVENTS, unsent=UNSENT,
             only=sql.SQL("" if event_ids is None else "WHERE e.event_id = ANY(%(ids)s)"))
    return [LedgerRow(*row) for row in conn.execute(query, {"ids": event_ids} if event_ids is not None else None)]


@translated()
def retained_since(conn: Connection, retention: dt.timedelta) -> dt.datetime | None:
    """No event sent later than this has had its row deleted by retention (None: retention is off).

    Retention deletes sent batches oldest first, so a deleted row was sent no later than the oldest batch
    kept; with none kept, no later than ``retention`` ago (the relay's OUTBOX_RETENTION_HOURS)."""
    if not retention:
        return None
    row = conn.execute(sql.SQL("SELECT coalesce(min(sent_at), now() - %s) FROM {}").format(SENT),
                       (retention,)).fetchone()
    return row[0] if row else None
