"""The backlog snapshot's reads (``outbox_relay.monitor`` assembles and renders them).

Every query reads the narrow unsent table (whose size is the backlog) or the last minute's sent
batches, and reads events by primary key, so the cost follows the backlog, not the table: ten
million sent rows cost nothing. Counts stop at ``cap`` rows per question.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS, INSTANCES, LANES, SENT, UNSENT

# Each returns (topic, lane, figures...) rows.
BACKLOG = {
    # The failed keys are few (each is an operator's to-do); a hash of them marks the held rows.
    "pending": sql.SQL(
        "WITH f AS (SELECT e.key, min(e.id) AS first FROM {unsent} fu JOIN {events} e ON e.id = fu.id"
        " WHERE fu.state = 'failed' AND e.key IS NOT NULL AND %(hold)s GROUP BY e.key)"
        " SELECT topic, lane_key %% %(lanes)s, count(*),"
        " count(*) FILTER (WHERE NOT held AND due <= now()),"
        " count(*) FILTER (WHERE NOT held AND due > now()), count(*) FILTER (WHERE held),"
        " extract(epoch FROM now() - min(created_at) FILTER (WHERE NOT held AND due <= now()))"
        " FROM (SELECT e.topic, p.lane_key, coalesce(p.due_at, e.created_at) AS due, e.created_at,"
        " coalesce(f.first < p.id, false) AS held"
        " FROM (SELECT id, lane_key, due_at FROM {unsent} WHERE state = 'pending' LIMIT %(cap)s) p"
        " JOIN {events} e ON e.id = p.id LEFT JOIN f ON f.key = e.key) q"
        " GROUP BY 1, 2"
    ).format(events=EVENTS, unsent=UNSENT),
    "failed": sql.SQL(
        "SELECT e.topic, f.lane_key %% %(lanes)s, count(*)"
        " FROM (SELECT id, lane_key FROM {unsent} WHERE state = 'failed' LIMIT %(cap)s) f"
        " JOIN {events} e ON e.id = f.id GROUP BY 1, 2"
    ).format(events=EVENTS, unsent=UNSENT),
    # The last minute's batches, their events read by id (at most ``cap``).
    "sent": sql.SQL(
        "SELECT e.topic, e.lane_key %% %(lanes)s, count(*) FROM (SELECT unnest(ids) AS id FROM {sent}"
        " WHERE sent_at > now() - interval '1 minute' LIMIT %(cap)s) s JOIN {events} e ON e.id = s.id GROUP BY 1, 2"
    ).format(events=EVENTS, sent=SENT),
}
# Unsent rows in id order (their primary key): the first that is pending, due and not held.
_OLDEST = sql.SQL(
    "SELECT extract(epoch FROM now() - e.created_at) FROM {unsent} u JOIN {events} e ON e.id = u.id"
    " WHERE u.state = 'pending' AND coalesce(u.due_at, e.created_at) <= now() AND (NOT %(hold)s OR e.key IS NULL"
    " OR NOT EXISTS (SELECT 1 FROM {unsent} fu JOIN {events} f ON f.id = fu.id WHERE fu.state = 'failed'"
    " AND fu.lane_key = u.lane_key AND fu.id < u.id AND f.key = e.key)) ORDER BY u.id LIMIT 1"
).format(events=EVENTS, unsent=UNSENT)
_OWNERS = sql.SQL(
    "SELECT lane, owner, extract(epoch FROM now() - heartbeat_at) FROM {} WHERE lane < %s ORDER BY lane"
).format(LANES)
# Live as the relays judge it (Store.register_instance): a recent heartbeat and its control session still
# there, so a killed instance leaves the list at once, not a minute later.
_INSTANCES = sql.SQL(
    "SELECT name FROM {} i WHERE heartbeat_at > now() - interval '1 minute'"
    " AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = i.backend_pid) ORDER BY name"
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
