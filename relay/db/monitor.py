"""The backlog snapshot's reads (``outbox_relay.monitor`` assembles and renders them).

Every query goes through a partial index (pending, failed, recently sent), so the cost follows the
backlog, not the table: ten million sent rows cost nothing. Counts stop at ``cap`` rows per question.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS, INSTANCES, LANES

# Each returns (topic, lane, figures...) rows.
BACKLOG = {
    # The failed keys are few (each is an operator's to-do); a hash of them marks the held rows.
    "pending": sql.SQL(
        "WITH f AS (SELECT key, min(id) AS first FROM {events} WHERE state = 'failed' AND key IS NOT NULL"
        " AND %(hold)s GROUP BY key)"
        " SELECT topic, lane_key %% %(lanes)s, count(*),"
        " count(*) FILTER (WHERE NOT held AND available_at <= now()),"
        " count(*) FILTER (WHERE NOT held AND available_at > now()), count(*) FILTER (WHERE held),"
        " extract(epoch FROM now() - min(created_at) FILTER (WHERE NOT held AND available_at <= now()))"
        " FROM (SELECT p.topic, p.lane_key, p.available_at, p.created_at, coalesce(f.first < p.id, false) AS held"
        " FROM (SELECT id, topic, key, lane_key, available_at, created_at FROM {events} WHERE state = 'pending'"
        " LIMIT %(cap)s) p LEFT JOIN f ON f.key = p.key) q"
        " GROUP BY 1, 2"
    ).format(events=EVENTS),
    "failed": sql.SQL(
        "SELECT topic, lane_key %% %(lanes)s, count(*)"
        " FROM (SELECT topic, lane_key FROM {} WHERE state = 'failed' LIMIT %(cap)s) f GROUP BY 1, 2"
    ).format(EVENTS),
    "sent": sql.SQL(
        "SELECT topic, lane_key %% %(lanes)s, count(*) FROM (SELECT topic, lane_key FROM {}"
        " WHERE state = 'sent' AND sent_at > now() - interval '1 minute' LIMIT %(cap)s) s GROUP BY 1, 2"
    ).format(EVENTS),
}
_OLDEST = sql.SQL(
    "SELECT extract(epoch FROM now() - e.created_at) FROM {events} e"
    " WHERE e.state = 'pending' AND e.available_at <= now() AND (NOT %(hold)s OR e.key IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM {events} f WHERE f.state = 'failed' AND f.key = e.key AND f.id < e.id)) ORDER BY e.id LIMIT 1"
).format(events=EVENTS)
_OWNERS = sql.SQL(
    "SELECT lane, owner, extract(epoch FROM now() - heartbeat_at) FROM {} WHERE lane < %s ORDER BY lane"
).format(LANES)
_INSTANCES = sql.SQL(
    "SELECT name FROM {} WHERE heartbeat_at > now() - interval '1 minute' ORDER BY name"
).format(INSTANCES)

# A relay names its Kafka trouble in its control session's application_name ("outbox-relay control: ...").
_TROUBLES = sql.SQL(
    "SELECT i.name, substr(a.application_name, length('outbox-relay control: ') + 1) FROM {} i"
    " JOIN pg_stat_activity a ON a.pid = i.backend_pid WHERE i.heartbeat_at > now() - interval '1 minute'"
    " AND a.application_name LIKE 'outbox-relay control: %%' ORDER BY i.name"
).format(INSTANCES)

STATUS_QUERIES = [*BACKLOG.values(), _OLDEST]  # what the EXPLAIN test checks


@translated()
def backlog(conn: Connection, lanes: int, cap: int, hold: bool) -> dict[str, list[tuple[Any, ...]]]:
    """Per kind (pending, failed, sent): rows of (topic, lane, figures...), at most ``cap`` rows counted."""
    params = {"lanes": lanes, "cap": cap, "hold": hold}
    return {kind: conn.execute(query, params).fetchall() for kind, query in BACKLOG.items()}


@translated()
def oldest_claimable_age(conn: Connection, hold: bool) -> float | None:
    """The exact age of the oldest claimable event: the first in the pending index, whatever the cap."""
    row = conn.execute(_OLDEST, {"hold": hold}).fetchone()
    return float(row[0]) if row and row[0] is not None else None


@translated()
def lane_owners(conn: Connection, lane_count: int) -> list[tuple[int, str | None, float | None]]:
    """(lane, owner, seconds since its heartbeat) of each lane below the lane count."""
    return [(lane, owner, float(age) if age is not None else None)
            for lane, owner, age in conn.execute(_OWNERS, (lane_count,))]


@translated()
def live_instances(conn: Connection) -> list[str]:
    return [row[0] for row in conn.execute(_INSTANCES)]


@translated()
def instance_troubles(conn: Connection) -> dict[str, str]:
    """Live instance -> the Kafka trouble it names in its control session (see ``Relay._announce_kafka_trouble``)."""
    return {name: trouble for name, trouble in conn.execute(_TROUBLES)}
