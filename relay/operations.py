"""Operator queries: the backlog at a glance and the failed-event tools."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import psycopg
from psycopg import sql

from models import EVENTS_TABLE, INSTANCES_TABLE, LANES_TABLE, SCHEMA

log = logging.getLogger(__name__)

_EVENTS = sql.Identifier(SCHEMA, EVENTS_TABLE)
_LANES = sql.Identifier(SCHEMA, LANES_TABLE)


@dataclasses.dataclass(frozen=True)
class TopicBacklog:
    topic: str
    pending: int
    claimable: int
    delayed: int
    failed: int
    oldest_claimable_age_s: float | None


def backlog(conn: psycopg.Connection[Any]) -> list[TopicBacklog]:
    """Per topic: counts of unsent events and the age of the oldest one the relay could publish now.

    Reads only unsent rows (through the pending and failed partial indexes), never sent history.
    """
    query = sql.SQL(
        "SELECT topic,"
        " count(*) FILTER (WHERE state = 'pending'),"
        " count(*) FILTER (WHERE state = 'pending' AND available_at <= now()),"
        " count(*) FILTER (WHERE state = 'pending' AND available_at > now()),"
        " count(*) FILTER (WHERE state = 'failed'),"
        " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending' AND available_at <= now()))"
        " FROM {} WHERE state IN ('pending', 'failed') GROUP BY topic ORDER BY topic"
    ).format(_EVENTS)
    return [
        TopicBacklog(topic, pending, claimable, delayed, failed, float(age) if age is not None else None)
        for topic, pending, claimable, delayed, failed, age in conn.execute(query).fetchall()
    ]


def lane_owners(conn: psycopg.Connection[Any]) -> list[tuple[int, str | None, float | None]]:
    """(lane, owner, seconds since its last heartbeat) for every lane that ever had an owner."""
    query = sql.SQL(
        "SELECT lane, owner, extract(epoch FROM now() - heartbeat_at) FROM {} ORDER BY lane"
    ).format(_LANES)
    return [(lane, owner, float(age) if age is not None else None) for lane, owner, age in conn.execute(query)]


def lane_view(conn: psycopg.Connection[Any]) -> tuple[int, bool, list[str]]:
    """(lane count, whether a change is under way, instances seen in the last minute)."""
    from relay.store import Store

    count, resizing = Store.lane_settings(conn)
    instances = [row[0] for row in conn.execute(
        sql.SQL("SELECT name FROM {} WHERE heartbeat_at > now() - interval '1 minute' ORDER BY name").format(
            sql.Identifier(SCHEMA, INSTANCES_TABLE)))]
    return count, resizing, instances


def _selector(ids: list[int] | None, topic: str | None, everything: bool) -> tuple[sql.Composable, list[Any]]:
    if ids:
        return sql.SQL("id = ANY(%s)"), [ids]
    if topic:
        return sql.SQL("topic = %s"), [topic]
    if everything:
        return sql.SQL("TRUE"), []
    raise ValueError("say which failed events: ids, a topic, or all")


def failed_events(conn: psycopg.Connection[Any], limit: int = 100) -> list[tuple[int, str, str, int, str]]:
    """(id, event id, topic, attempts, last error) of failed events, oldest first."""
    query = sql.SQL(
        "SELECT id, event_id::text, topic, attempts, coalesce(last_error, '') FROM {}"
        " WHERE state = 'failed' ORDER BY id LIMIT %s"
    ).format(_EVENTS)
    return list(conn.execute(query, (limit,)).fetchall())


def retry_failed(conn: psycopg.Connection[Any], *, ids: list[int] | None = None, topic: str | None = None,
                 everything: bool = False, dry_run: bool = False) -> int:
    """Put failed events back to pending with a fresh attempt count; returns how many."""
    return _change_failed(conn, "state = 'pending', attempts = 0, available_at = now()", "retry",
                          ids, topic, everything, dry_run)


def discard_failed(conn: psycopg.Connection[Any], *, ids: list[int] | None = None, topic: str | None = None,
                   everything: bool = False, dry_run: bool = False) -> int:
    """Give up on failed events (kept as discarded, for the record); returns how many."""
    return _change_failed(conn, "state = 'discarded'", "discard", ids, topic, everything, dry_run)


def _change_failed(conn: psycopg.Connection[Any], assignment: str, action: str, ids: list[int] | None,
                   topic: str | None, everything: bool, dry_run: bool) -> int:
    where, params = _selector(ids, topic, everything)
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'failed' AND {}").format(_EVENTS, where)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL("UPDATE {} SET " + assignment + " WHERE state = 'failed' AND {}").format(_EVENTS, where)
    count = conn.execute(query, params).rowcount
    log.info("operator %s of %d failed events (ids=%s topic=%s all=%s)", action, count, ids, topic, everything,
             extra={"action": f"failed_{action}", "count": count})
    return count
