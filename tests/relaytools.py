"""Running real relay processes in tests, writing events, and reading the ledger back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from outbox_relay import enqueue
from outbox_relay.verify import LedgerMessage, LedgerReport, LedgerRow, check
from tests import kafkatools

ROOT = Path(__file__).resolve().parent.parent

# Fast reactions for tests; every value is an ordinary setting a user could choose.
FAST = {
    "OUTBOX_POLL_INTERVAL": "0.1",
    "OUTBOX_LANE_INTERVAL": "0.3",
    "OUTBOX_BACKOFF_INITIAL": "0.2",
    "OUTBOX_BACKOFF_MAX": "2",
    "OUTBOX_INSTANCE_TIMEOUT": "2",
    "OUTBOX_LOG_LEVEL": "INFO",
}


class RelayProcess:
    """`outbox-relay run` as a child process, its log in a file."""

    def __init__(self, database_url: str, log_dir: Path, name: str = "relay", **settings: Any) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **FAST, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_INSTANCE": name,
                    **{key: str(value) for key, value in settings.items()}}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "outbox_relay.cli", "run"], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(*args: str) -> None:
    """Drive the local services (scripts/services): `service("down", "kafka")`, `service("kill")`..."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "services"), *args], check=True, capture_output=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT state, count(*) FROM outbox.events GROUP BY state")).all())


def pending(engine: Engine) -> int:
    return states(engine).get("pending", 0)


def lane_owner(engine: Engine, lane: int = 0) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT owner FROM outbox.events_lanes WHERE lane = :l"), {"l": lane}).scalar()


def ledger_rows(engine: Engine) -> list[LedgerRow]:
    with engine.connect() as conn:
        result = conn.execute(text("SELECT id, event_id::text, topic, key, state FROM outbox.events ORDER BY id"))
        return [LedgerRow(*row) for row in result]


def ledger(engine: Engine, topics: list[str], *, timeout: float = 60, quiet: float = 2.0,
           expect_all_sent: bool = True) -> LedgerReport:
    """Read every topic back (read_committed) and compare with the table."""
    rows = ledger_rows(engine)
    expected = sum(1 for r in rows if r.state == "sent" or (expect_all_sent and r.state == "pending"))
    received = kafkatools.consume(topics, expected=expected, timeout=timeout, quiet=quiet)
    messages = [
        LedgerMessage(m.topic, m.partition, m.offset, m.key, m.event_id) for m in received
    ]
    return check(rows, messages, expect_all_sent=expect_all_sent)


class Writers:
    """Threads committing (and sometimes rolling back) transactions of events until stopped.

    Each key belongs to one writer thread, as each aggregate of an application is changed by one
    transaction at a time (its row lock): per-key order is only defined for writes that are
    ordered. Two concurrent transactions writing one key have no order for the relay to keep.
    """

    def __init__(self, engine: Engine, topic: str, *, threads: int = 4, keys: int = 10,
                 per_transaction: int = 5, rollback_every: int = 5, limit: int | None = None) -> None:
        self.engine = engine
        self.topic = topic
        self.keys = keys
        self.per_transaction = per_transaction
        self.rollback_every = rollback_every
        self.limit = limit
        self.committed: list[str] = []
        self.rolled_back: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(threads)]
        self.errors: list[BaseException] = []

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def _write(self, writer: int) -> None:
        transaction = 0
        while not self._stop.is_set():
            with self._lock:
                if self.limit is not None and len(self.committed) >= self.limit:
                    return
            transaction += 1
            ids = []
            try:
                with self.engine.connect() as conn, conn.begin() as tx:
                    for i in range(self.per_transaction):
                        own_keys = max(1, self.keys // len(self._threads))
                        key = f"key-{writer + len(self._threads) * ((transaction + i) % own_keys)}"
                        ids.append(str(enqueue(conn, self.topic, {"w": writer, "t": transaction, "i": i}, key=key)))
                    if self.rollback_every and transaction % self.rollback_every == 0:
                        tx.rollback()
                        with self._lock:
                            self.rolled_back += ids
                        continue
            except Exception as exc:  # the database may be restarting under a fault test: try again
                self.errors.append(exc)
                time.sleep(0.2)
                continue
            with self._lock:
                self.committed += ids
            time.sleep(0.005)


def set_lane_count(engine: Engine, lanes: int) -> None:
    """Test set-up only, before any relay runs: production uses `outbox-relay lanes set`."""
    from outbox_relay.store import Store

    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox.events_settings SET lane_count = :n"), {"n": lanes})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        Store.create_lane_index(conn.connection.driver_connection, lanes)


def lane_owners(engine: Engine) -> dict[int, str]:
    """Owners of lanes that are really held right now (their advisory lock is granted)."""
    from outbox_relay.store import LOCK_CLASS

    with engine.connect() as conn:
        held = {row[0] for row in conn.execute(text(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = :c"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"), {"c": LOCK_CLASS})}
        rows = conn.execute(text("SELECT lane, owner FROM outbox.events_lanes WHERE owner IS NOT NULL"))
        return {lane: owner for lane, owner in rows if lane in held}
