"""`cancelled_after`, the whole-check bound of `status --timeout`, with a stand-in connection (no services)."""

from __future__ import annotations

import threading
import time
from typing import Any

from outbox_relay.db.connection import cancelled_after


class Conn:
    """Counts cancels; each one takes `cancel_takes` seconds (a server that vanished: TCP retries its connect)."""

    def __init__(self, cancel_takes: float = 0.0) -> None:
        self.cancels: list[float] = []
        self.cancel_takes = cancel_takes

    def cancel(self) -> None:
        self.cancels.append(time.monotonic())
        time.sleep(self.cancel_takes)


def run(conn: Any, seconds: float, body_takes: float) -> float:
    started = time.monotonic()
    with cancelled_after(conn, seconds):
        time.sleep(body_takes)
    return time.monotonic() - started


def test_a_check_that_ends_in_time_is_never_cancelled() -> None:
    conn = Conn()
    run(conn, 0.3, 0.01)
    time.sleep(0.5)
    assert conn.cancels == []


def test_past_the_deadline_it_cancels_again_until_the_check_ends_and_never_after() -> None:
    """One cancel between two statements finds nothing running; the next statement must be cancelled too."""
    conn = Conn()
    run(conn, 0.05, 0.4)
    ended = time.monotonic()
    assert len(conn.cancels) >= 3
    time.sleep(0.3)
    assert all(at <= ended for at in conn.cancels)


def test_the_check_ends_without_waiting_for_a_cancel_to_a_vanished_server() -> None:
    """Waiting for a cancel on its way (so it cannot hit a later statement) is bounded: without the bound,
    a server gone from the network kept `status` until TCP gave up connecting (minutes)."""
    conn = Conn(cancel_takes=30.0)
    took = run(conn, 0.01, 0.1)
    assert took < 10  # the bound is 2 s; 10 leaves room for a loaded machine, 30 is the cancel's own time
    assert len(conn.cancels) == 1
    assert any(t.name == "outbox-relay cancel" for t in threading.enumerate())  # left to finish on its own
