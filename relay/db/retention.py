"""Retention: delete sent and discarded events older than the retention, in small batches."""

from __future__ import annotations

import datetime as dt
import time

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import EVENTS

# Sent events age from when they were sent; discarded ones (never sent) from when they were written.
_AGE_COLUMNS = (("sent", "sent_at"), ("discarded", "created_at"))
_DELETE = {
    state: sql.SQL(
        "DELETE FROM {events} WHERE id IN (SELECT id FROM {events} WHERE state = %s"
        " AND {column} < now() - %s ORDER BY {column} LIMIT %s FOR UPDATE SKIP LOCKED)"
    ).format(events=EVENTS, column=sql.Identifier(column))
    for state, column in _AGE_COLUMNS
}


@translated()
def delete_expired(conn: Connection, retention: dt.timedelta, *, batch: int = 1000, budget_s: float = 10.0) -> int:
    """Delete sent and discarded events older than the retention, in small batches (short locks,
    no giant transaction), for at most ``budget_s`` seconds. Returns how many were deleted."""
    deleted = 0
    deadline = time.monotonic() + budget_s
    for state, query in _DELETE.items():
        while time.monotonic() < deadline:
            count = conn.execute(query, (state, retention, batch)).rowcount
            deleted += count
            if count < batch:
                break
    return deleted
