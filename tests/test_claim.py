"""The claim against real PostgreSQL: what it returns, and that delayed events cost it nothing until due."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from outbox_relay.db.connection import connect
from outbox_relay.db.lanes import Store
from outbox_relay.db.operations import Selection, change_failed
from tests.pgtools import EVENTS, UNSENT

BATCH = 100


def _add(conn: psycopg.Connection[Any], count: int, delay: str = "0 seconds") -> None:
    conn.execute(f"INSERT INTO {EVENTS} (topic, key, value, available_at) SELECT 't', convert_to('k' || g, 'UTF8'),"
                 " convert_to(repeat('x', 512), 'UTF8'), now() + %s::interval FROM generate_series(1, %s) g",
                 (delay, count))
    conn.execute(f"ANALYZE {EVENTS}")
    conn.execute(f"ANALYZE {UNSENT}")


def _buffers(conn: psycopg.Connection[Any], store: Store, unmarked: list[int] | None = None) -> tuple[int, int]:
    """(rows the claim returned, shared buffers it touched), from EXPLAIN (ANALYZE, BUFFERS)."""
    query = b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + store.claim_query(1).as_bytes(conn)
    row = conn.execute(query, {"lane": 0, "limit": BATCH, "unmarked": unmarked or []}).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    return int(plan["Actual Rows"]), int(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0))


@pytest.fixture
def lane_conn(database_url: str) -> Any:
    with connect(database_url, lane=True) as conn:
        yield conn


def test_a_claim_does_not_walk_delayed_events_that_are_not_due(lane_conn: psycopg.Connection[Any]) -> None:
    store = Store()
    _add(lane_conn, 20_000)
    lane_conn.execute(f"DELETE FROM {UNSENT}")  # as if sent: a table of the same size, nothing else to claim
    _add(lane_conn, BATCH)
    rows, alone = _buffers(lane_conn, store)
    assert rows == BATCH
    # 20,000 events written before the due ones, due in an hour: the v5 lane index held them all,
    # so the claim read each of them (about 1,800 buffers) to find the due ones behind.
    lane_conn.execute(f"DELETE FROM {UNSENT}")
    lane_conn.execute(f"DELETE FROM {EVENTS}")
    _add(lane_conn, 20_000, "1 hour")
    _add(lane_conn, BATCH)
    rows, with_delayed = _buffers(lane_conn, store)
    assert rows == BATCH
    assert with_delayed <= alone + 10, (alone, with_delayed)


def test_due_delayed_events_are_claimed_in_id_order_with_the_others(lane_conn: psycopg.Connection[Any]) -> None:
    store = Store()
    _add(lane_conn, 3, "1 hour")  # ids 1-3: not due
    _add(lane_conn, 2)  # ids 4-5
    lane_conn.execute(f"UPDATE {UNSENT} SET due_at = now() - interval '1 second' WHERE id = 2")  # due now
    _add(lane_conn, 1)  # id 6
    claimed = [row.id for row in store.claim(lane_conn, 0, 1, BATCH)]
    assert claimed == [2, 4, 5, 6]
    # A batch published and not marked yet is not claimed again while its mark is on its way.
    assert [row.id for row in store.claim(lane_conn, 0, 1, BATCH, unmarked=[2, 4])] == [5, 6]
    marking = store.send_mark(lane_conn, [2, 4])
    assert marking.wait() == 2
    assert [row.id for row in store.claim(lane_conn, 0, 1, BATCH)] == [5, 6]


def test_a_retried_failed_event_is_claimed_before_the_events_its_key_held(lane_conn: psycopg.Connection[Any]) -> None:
    """`failed retry` puts the event back ahead of its key's later events, however many delayed
    events of other keys fell due before the retry (they fill the due branch of the claim first)."""
    store = Store()
    lane_conn.execute(f"INSERT INTO {EVENTS} (topic, key, value) VALUES ('t', 'k', 'first'), ('t', 'k', 'second')")
    store.record_failure(lane_conn, 1, "rejected", park=True)  # id 1 parked; id 2 held behind it
    # Delayed events of other keys, due a minute ago: ids 3-4.
    lane_conn.execute(f"INSERT INTO {EVENTS} (topic, key, value, created_at, available_at) SELECT 't',"
                      " convert_to('other' || g, 'UTF8'), 'v', now() - interval '1 hour', now() - interval '1 minute'"
                      " FROM generate_series(1, 2) g")
    assert change_failed(lane_conn, "retry", Selection(ids=[1]), dry_run=False) == 1
    # Before: [2, 3], the held event published and the retried one behind it (its due time was the
    # retry's, later than the other delayed events', so the due branch's batch left it out).
    assert [row.id for row in store.claim(lane_conn, 0, 1, 2)] == [1, 2]

