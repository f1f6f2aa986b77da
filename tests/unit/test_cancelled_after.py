"""`cancelled_after`, the whole-check bound of `status --timeout`, with a stand-in connection (no services)."""

from __future__ import annotations

import socket
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay.db.connection import cancelled_after
from outbox_relay.errors import StatementCancelled


class Conn:
    """Counts cancels; each one takes `cancel_takes` seconds (a server that vanished: TCP retries its connect)."""

    def __init__(self, cancel_takes: float = 0.0) -> None:
        self.cancels: list[float] = []
        self.cancel_takes = cancel_takes
        self.closed = False

    def cancel(self) -> None:
        self.cancels.append(time.monotonic())
        time.sleep(self.cancel_takes)

    def close(self) -> None:
        self.closed = True


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
    assert conn.closed  # the cancel may still land: on a later statement of `status --watch`, before


def test_a_connection_whose_cancels_all_came_back_stays_open() -> None:
    conn = Conn()
    run(conn, 0.05, 0.3)
    assert conn.cancels and not conn.closed


class StoppedServerConn(Conn):
    """A connection whose backend takes no cancel (stopped): its reads end only when the socket is shut down."""

    def __init__(self) -> None:
        super().__init__()
        self.client, self.server = socket.socketpair()
        self.client.settimeout(10)  # a test that fails, not one that hangs
        self.pgconn = types.SimpleNamespace(socket=self.client.fileno())

    def read_reply(self) -> None:
        if not self.client.recv(1):  # what libpq waits on; b"" once shut down
            raise psycopg.OperationalError("server closed the connection unexpectedly")


@pytest.fixture
def stopped_server() -> Iterator[StoppedServerConn]:
    conn = StoppedServerConn()
    yield conn
    conn.client.close()
    conn.server.close()


def test_a_backend_that_takes_no_cancel_loses_its_connection_and_the_check_ends(
        stopped_server: StoppedServerConn) -> None:
    """A stopped backend holds its statement through every cancel, and its kernel answers keepalives:
    `status --timeout` waited for as long as it stayed stopped."""
    conn = stopped_server
    started = time.monotonic()
    with (pytest.raises(StatementCancelled, match=r"took no cancel within 1.1s: gave the connection up"),
          cancelled_after(conn, 0.1)):  # type: ignore[arg-type]
        conn.read_reply()
    assert 1.0 < time.monotonic() - started < 10
    assert conn.closed and len(conn.cancels) >= 10  # cancelled every 50 ms for a second first


def test_a_check_that_ends_after_a_cancel_keeps_its_connection(stopped_server: StoppedServerConn) -> None:
    conn = stopped_server
    conn.server.send(b"x")  # the reply comes
    with cancelled_after(conn, 0.05):  # type: ignore[arg-type]
        time.sleep(0.2)
        conn.read_reply()
    time.sleep(1.2)  # past the point where it would have given up
    conn.server.send(b"y")
    conn.read_reply()  # the socket still works
    assert not conn.closed


class FrozenServerConn(StoppedServerConn):
    """The whole server stopped (a frozen VM, a stopped postmaster): a cancel's connection is accepted or
    left unanswered, and ``cancel_safe`` waits until its timeout."""

    def cancel_safe(self, timeout: float) -> None:
        self.cancels.append(time.monotonic())
        time.sleep(timeout)
        raise psycopg.OperationalError("cancel timed out")


def test_a_frozen_server_is_given_up_a_second_past_the_deadline_not_a_cancel_wait_past_it() -> None:
    """The give-up came only after the first cancel's own wait (2 s) had ended: a frozen server held
    `status --timeout 3` for 5 s, where the README promises a second more."""
    conn = FrozenServerConn()
    try:
        started = time.monotonic()
        with pytest.raises(StatementCancelled), cancelled_after(conn, 0.1):  # type: ignore[arg-type]
            conn.read_reply()
        took = time.monotonic() - started
    finally:
        conn.client.close()
        conn.server.close()
    assert 1.0 < took < 1.7, took  # 0.1 + 1 s; it was 0.1 + 2 s
    assert conn.closed
