"""The daemon's backlog measurement spends a bounded share of PostgreSQL's time (no database: the snapshot is timed)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from outbox_relay import daemon
from outbox_relay.config import Settings
from outbox_relay.errors import DatabaseError
from outbox_relay.monitor import Backlog, Snapshot

SETTINGS = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u@h/db",
                                      "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092", "OUTBOX_BACKLOG_INTERVAL": "0.01"})


class FakeConnection:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def execute(self, statement: Any, *args: Any) -> FakeConnection:
        self.statements.append(statement)
        return self

    def fetchone(self) -> None:  # between snapshots, the oldest claimable age alone: none here
        return None


class FakeHeld:
    """HeldConnection without a database: its session statements run once, when it first connects."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.conn: FakeConnection | None = None

    @contextlib.contextmanager
    def use(self) -> Iterator[FakeConnection]:
        if self.conn is None:
            self.conn = FakeConnection()
            self.conn.execute(self.session)
        yield self.conn


def test_a_slow_snapshot_is_not_repeated_until_it_is_a_small_share_of_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[float] = []

    def slow_snapshot(conn: FakeConnection, **kwargs: Any) -> Snapshot:
        taken.append(time.monotonic())
        time.sleep(0.02)  # a backlog of millions: seconds, here scaled down
        return Snapshot(total=Backlog(pending=1_000_000), topics={}, lanes={}, owners=[], lane_count=4,
                        resizing=False, instances=[], capped=True)

    monkeypatch.setattr(daemon.monitor, "snapshot", slow_snapshot)
    relay = daemon.Relay(SETTINGS)
    relay._monitor = FakeHeld(relay._monitor.session)  # type: ignore[assignment]
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # the scheduler would call it every 10 ms
        relay._measure_backlog()
        time.sleep(0.01)
    # 20 ms (or more, on a busy machine) per measurement, at most 5% of the time: one every 0.4 s or
    # less often, so at most three in a second, not ~30.
    assert 1 <= len(taken) <= 3, taken
    assert all(later - earlier >= 0.02 / daemon.BACKLOG_BUDGET for earlier, later in itertools.pairwise(taken))
    # and without parallel workers, which would take the lanes' cores
    assert relay._monitor.conn is not None
    assert relay._monitor.conn.statements[0] == daemon.monitor.session(daemon.MONITOR_TIMEOUT_S)


def test_a_measurement_the_database_refuses_or_cancels_is_a_warning_not_a_job_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The monitor session bounds its statements (monitor.session): a statement left running would hold back
    vacuum of the tables every claim walks (seen in the retention bench: one ran 13 minutes). A cancelled one
    is said once, and the measurement is tried again later."""
    def cancelled(conn: FakeConnection, **kwargs: Any) -> Snapshot:
        raise DatabaseError("PostgreSQL refused: canceling statement due to statement timeout")

    monkeypatch.setattr(daemon.monitor, "snapshot", cancelled)
    relay = daemon.Relay(SETTINGS)
    relay._monitor = FakeHeld(relay._monitor.session)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="outbox_relay.daemon"):
        relay._measure_backlog()
    assert "statement_timeout = 60000" in relay._monitor.session
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("backlog not measured: PostgreSQL refused: canceling statement due to statement timeout;")
    assert message.endswith("the backlog gauges keep their last values until the next try in 0 s")  # 10 ms interval
    assert relay._backlog_due > 0  # tried again after its budget, like any measurement
