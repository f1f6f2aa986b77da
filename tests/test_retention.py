"""Retention's statements against real PostgreSQL, with events deleted by hand (what an operator may do)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay.db.connection import connect
from outbox_relay.db.retention import delete_expired, delete_orphans
from tests.pgtools import EVENTS, SENT, UNSENT, set_state_sql


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with connect(database_url) as conn:
        yield conn


def _add(conn: psycopg.Connection[Any], count: int) -> list[int]:
    return [row[0] for row in conn.execute(
        f"INSERT INTO {EVENTS} (topic, key, value) SELECT 't', convert_to('k' || g, 'UTF8'), 'x'"
        " FROM generate_series(1, %s) g RETURNING id", (count,))]


def _unsent_among(conn: psycopg.Connection[Any], ids: list[int]) -> set[int]:
    return {row[0] for row in conn.execute(f"SELECT id FROM {UNSENT} WHERE id = ANY(%s)", (ids,))}


def test_old_batches_whose_events_were_deleted_by_hand_do_not_stop_retention(conn: psycopg.Connection[Any]) -> None:
    ids = _add(conn, 15)
    # 12 batches sent 10 days ago whose events an operator deleted, then an old batch with its 3 events
    # still there, then a recent one: a statement deletes 10 batches, the first two delete no event.
    for n, event in enumerate(ids[:12]):
        sent_at = f"now() - interval '10 days' + {n} * interval '1 s'"
        conn.execute(set_state_sql("sent", f"e.id = {event}", sent_at=sent_at))
    conn.execute(f"DELETE FROM {EVENTS} WHERE id = ANY(%s)", (ids[:12],))
    conn.execute(set_state_sql("sent", f"e.id IN ({ids[12]}, {ids[13]})", sent_at="now() - interval '9 days'"))
    conn.execute(set_state_sql("sent", f"e.id = {ids[14]}", sent_at="now() - interval '1 hour'"))
    assert delete_expired(conn, dt.timedelta(days=1)) == 2
    assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {EVENTS}").fetchone() == ([ids[14]],)
    assert conn.execute(f"SELECT count(*) FROM {SENT}").fetchone() == (1,)


def test_unsent_rows_whose_event_was_deleted_by_hand_are_swept_a_window_at_a_time(
    conn: psycopg.Connection[Any],
) -> None:
    ids = _add(conn, 1000)
    by_hand = [ids[10], ids[11], ids[500], ids[999]]
    conn.execute(f"DELETE FROM {EVENTS} WHERE id = ANY(%s)", (by_hand,))
    # Each run reads one window of 400 unsent rows (the full anti-join read the whole backlog every run).
    deleted, after = delete_orphans(conn, 0, window=400)
    assert (deleted, after) == (2, ids[399])
    assert _unsent_among(conn, by_hand) == {ids[500], ids[999]}
    deleted, after = delete_orphans(conn, after, window=400)
    assert (deleted, after) == (1, ids[799])
    deleted, after = delete_orphans(conn, after, window=400)  # the end of the table: start again
    assert (deleted, after) == (1, 0)
    assert _unsent_among(conn, by_hand) == set()
    assert conn.execute(f"SELECT count(*) FROM {UNSENT}").fetchone() == (996,)
