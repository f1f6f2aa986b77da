"""Retention: delete sent and discarded events older than the retention, in small batches."""

from __future__ import annotations

import datetime as dt
import time

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS, SENT, UNSENT

# Sent events age from when their batch was sent: the oldest batches go, with their events.
# Returns (batches, events) deleted: a batch whose events were deleted by hand deletes no event.
_DELETE_SENT = sql.SQL(
    "WITH b AS (DELETE FROM {sent} WHERE id IN (SELECT id FROM {sent} WHERE sent_at < now() - %s"
    " ORDER BY sent_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING ids),"
    " e AS (DELETE FROM {events} WHERE id IN (SELECT unnest(ids) FROM b) RETURNING 1)"
    " SELECT (SELECT count(*) FROM b), (SELECT count(*) FROM e)"
).format(sent=SENT, events=EVENTS)
# Discarded events (never sent) age from when they were written.
_DELETE_DISCARDED = sql.SQL(
    "WITH u AS (DELETE FROM {unsent} WHERE id IN (SELECT u.id FROM {unsent} u JOIN {events} e ON e.id = u.id"
    " WHERE u.state = 'discarded' AND e.created_at < now() - %s ORDER BY u.id LIMIT %s FOR UPDATE OF u SKIP LOCKED)"
    " RETURNING id) DELETE FROM {events} WHERE id IN (SELECT id FROM u)"
).format(unsent=UNSENT, events=EVENTS)
# Unsent rows whose event is gone (deleted by hand): claims would step over them for ever. One window of
# the unsent table per run, in id order, so a run costs the same with a backlog of ten million; each run
# takes the next window, and the last one starts again at the beginning. Returns the window's last id.
_DELETE_ORPHANS = sql.SQL(
    "WITH w AS (SELECT id FROM {unsent} WHERE id > %(after)s ORDER BY id LIMIT %(window)s),"
    " gone AS (DELETE FROM {unsent} u USING w WHERE u.id = w.id"
    " AND NOT EXISTS (SELECT 1 FROM {events} e WHERE e.id = u.id) RETURNING u.id)"
    " SELECT max(w.id), count(*), (SELECT count(*) FROM gone) FROM w"
).format(unsent=UNSENT, events=EVENTS)
ORPHAN_WINDOW = 50_000
# A batch holds up to a relay's batch size of events: this many batches make one small delete.
_BATCHES_PER_DELETE = 10


@translated()
def delete_expired(conn: Connection, retention: dt.timedelta, *, batch: int = 1000, budget_s: float = 10.0) -> int:
    """Delete sent and discarded events older than the retention, in small batches (short locks,
    no giant transaction), for at most ``budget_s`` seconds. Returns how many were deleted."""
    deleted = 0
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        batches, events = conn.execute(_DELETE_SENT, (retention, _BATCHES_PER_DELETE)).fetchone() or (0, 0)
        deleted += events
        if batches == 0:
            break
    while time.monotonic() < deadline:
        count = conn.execute(_DELETE_DISCARDED, (retention, batch)).rowcount
        deleted += count
        if count < batch:
            break
    return deleted


@translated()
def delete_orphans(conn: Connection, after: int, *, window: int = ORPHAN_WINDOW) -> tuple[int, int]:
    """Delete the unsent rows without an event among the ``window`` unsent ids after ``after``. Returns
    (rows deleted, where the next run starts: 0 once the window reached the end of the table)."""
    last, seen, deleted = conn.execute(_DELETE_ORPHANS, {"after": after, "window": window}).fetchone() or (None, 0, 0)
    return int(deleted), (int(last) if last is not None and seen == window else 0)
