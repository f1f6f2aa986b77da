"""Running real relay processes in tests, writing events, and reading the ledger back."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from outbox_relay import enqueue
from outbox_relay.config import Settings
from outbox_relay.db.operations import ledger_rows
from outbox_relay.verify import LedgerMessage, LedgerReport, check
from tests import kafkatools
from tests.pgtools import EVENT_STATES, LANES, SETTINGS

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

# The same for consumers (`outbox-relay inbox run`). A SIGKILLed member holds the group's next rebalance
# up until its session times out (librdkafka's default 45 s): 6 s, the broker's minimum, for tests.
INBOX_FAST = {
    "OUTBOX_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "OUTBOX_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "OUTBOX_INBOX_POLL_INTERVAL": "0.2",
    "OUTBOX_INBOX_BACKOFF_INITIAL": "0.1",
    "OUTBOX_INBOX_BACKOFF_MAX": "1",
}

# What a relay may take beyond its own shutdown bound (OUTBOX_SHUTDOWN_TIMEOUT, after which it exits
# anyway) to leave the interpreter once it has stopped.
EXIT_GRACE = 10.0


class RelayDidNotStop(AssertionError):
    """A relay outlived its shutdown bound after SIGTERM: it was killed, and the test fails."""


class RelayProcess:
    """`outbox-relay run` as a child process, its log in a file. Tests get these from the `relays` fixture."""

    def __init__(self, database_url: str, log_dir: Path, name: str = "relay", *,
                 tuning: Mapping[str, str] = FAST, **settings: Any) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **tuning, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_INSTANCE": name,
                    **{key: str(value) for key, value in settings.items()}}
        self.command = [sys.executable, "-m", "outbox_relay", "run"]
        self.exit_grace = EXIT_GRACE
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=ROOT)
        STARTED.append(self)
        return self

    @property
    def shutdown_bound(self) -> float:
        """Seconds from SIGTERM to exit: the relay's own bound, then a little for the interpreter."""
        return float(self.env.get("OUTBOX_SHUTDOWN_TIMEOUT", Settings.shutdown_timeout)) + self.exit_grace

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM), if it still runs."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float | None = None, *, signalled_at: float | None = None) -> int:
        """Wait for the exit after SIGTERM; past `timeout` (default: the shutdown bound) SIGKILL it and fail.

        The bound runs from `signalled_at` (time.monotonic() when SIGTERM was sent), or from now.
        """
        assert self.process is not None
        bound = self.shutdown_bound if timeout is None else timeout
        elapsed = 0.0 if signalled_at is None else time.monotonic() - signalled_at
        try:
            return self.process.wait(max(0.0, bound - elapsed))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise RelayDidNotStop(f"relay {self.name!r} did not exit within {bound:.0f}s of SIGTERM and was"
                                  f" killed; the end of its log:\n{self.log()[-3000:]}") from None

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM and wait; returns the exit code. A relay that overruns is killed and the test fails."""
        self.terminate()
        return self.wait_stopped(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for the relay to exit by itself; returns the exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def gave_up(self) -> bool:
        """It exited through its own shutdown deadline (OUTBOX_SHUTDOWN_TIMEOUT), not by finishing its stop."""
        return self.process is not None and self.process.returncode == 1 and "shutdown took longer" in self.log()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


# Every relay process started in this interpreter, until stopped by `stop_every`.
STARTED: list[RelayProcess] = []


def stop_every(relays: list[RelayProcess]) -> list[str]:
    """SIGTERM every relay still running, all at once, then wait for each within its bound.

    Whatever happens, none is left running: one that overruns is killed. Returns what went wrong
    (one line per relay that had to be killed), for the caller to fail on.
    """
    running = [relay for relay in relays if relay.alive]
    for relay in running:
        relay.terminate()
    signalled_at = time.monotonic()
    problems = []
    for relay in running:
        try:
            relay.wait_stopped(signalled_at=signalled_at)
        except RelayDidNotStop as exc:
            problems.append(str(exc))
    return problems


class Relays:
    """The relays one test (or one bench run) started; `stop_all` stops every one (the `relays` fixture)."""

    def __init__(self, log_dir: Path, *, tuning: Mapping[str, str] = FAST) -> None:
        self.log_dir = log_dir
        self.tuning = tuning
        self.started: list[RelayProcess] = []

    def start(self, database_url: str, name: str = "relay", **settings: Any) -> RelayProcess:
        relay = RelayProcess(database_url, self.log_dir, name, tuning=self.tuning, **settings).start()
        self.started.append(relay)
        return relay

    def start_inbox(self, consumer_url: str, handler: str, name: str = "inbox", **settings: Any) -> RelayProcess:
        """`outbox-relay inbox run HANDLER` as a child process, stopped like a relay (its own log, same bounds)."""
        consumer = RelayProcess(consumer_url, self.log_dir, name, tuning={**INBOX_FAST, "OUTBOX_LOG_LEVEL": "INFO"},
                                OUTBOX_INBOX_DATABASE_URL=consumer_url, **settings)
        consumer.command = [sys.executable, "-m", "outbox_relay", "inbox", "run", handler]
        consumer.start()
        self.started.append(consumer)
        return consumer

    def stop_all(self) -> None:
        """Stop every relay started here (all at once); fail if one had to be killed."""
        problems = stop_every(self.started)
        if problems:
            raise RelayDidNotStop("\n\n".join(problems))


def cli(database_url: str, *args: str, check: bool = False, timeout: float = 120,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`outbox-relay <args> --database-url <url>` in a subprocess, its output as text."""
    return subprocess.run([sys.executable, "-m", "outbox_relay", *args, "--database-url", database_url],
                          capture_output=True, text=True, check=check, timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(*args: str, check: bool = True) -> None:
    """Drive the local services (scripts/services): `service("down", "kafka")`, `service("kill")`..."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "services"), *args], check=check, capture_output=True)


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


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
        return dict(conn.execute(text(f"SELECT state, count(*) FROM {EVENT_STATES} GROUP BY state")).all())


def pending(engine: Engine) -> int:
    return states(engine).get("pending", 0)


def lane_owner(engine: Engine, lane: int = 0) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT owner FROM {LANES} WHERE lane = :l"), {"l": lane}).scalar()


def ledger(engine: Engine, topics: list[str], *, timeout: float = 60, quiet: float = 2.0,
           expect_all_sent: bool = True) -> LedgerReport:
    """Read every topic back (read_committed) and compare with the table."""
    with engine.connect() as conn:
        rows = ledger_rows(conn.connection.driver_connection)  # the one the `verify` command reads
    expected = sum(1 for r in rows if r.state == "sent" or (expect_all_sent and r.state == "pending"))
    received = kafkatools.consume(topics, expected=expected, timeout=timeout, quiet=quiet)
    messages = [
        LedgerMessage(m.topic, m.partition, m.offset, m.key, m.event_id) for m in received
    ]
    return check(rows, messages, expect_all_sent=expect_all_sent)


@dataclasses.dataclass(eq=False)
class Writers:
    """Threads committing (and sometimes rolling back) transactions of events until stopped.

    Each key belongs to one writer thread, as each aggregate of an application is changed by one
    transaction at a time (its row lock): per-key order is only defined for writes that are
    ordered. Two concurrent transactions writing one key have no order for the relay to keep.
    """

    engine: Engine
    topic: str
    _: dataclasses.KW_ONLY
    threads: int = 4
    keys: int = 10
    per_transaction: int = 5
    rollback_every: int = 5
    limit: int | None = None
    committed: list[str] = dataclasses.field(default_factory=list, init=False)
    rolled_back: list[str] = dataclasses.field(default_factory=list, init=False)
    errors: list[BaseException] = dataclasses.field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(self.threads)]

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
    from outbox_relay.db.lanes import Store

    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {SETTINGS} SET lane_count = :n"), {"n": lanes})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        Store.create_lane_index(conn.connection.driver_connection, lanes)


def lane_owners(engine: Engine) -> dict[int, str]:
    """Owners of lanes that are really held right now (their advisory lock is granted)."""
    from outbox_relay.db.names import LOCK_CLASS

    with engine.connect() as conn:
        held = {row[0] for row in conn.execute(text(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = :c"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"), {"c": LOCK_CLASS})}
        rows = conn.execute(text(f"SELECT lane, owner FROM {LANES} WHERE owner IS NOT NULL"))
        return {lane: owner for lane, owner in rows if lane in held}


def drain_through_fault(engine: Engine, database_url: str, topic: str, relays: Relays, fault: Callable[[], None],
                        *, recover_within: float = 180, **settings: Any) -> LedgerReport:
    """The outage skeleton: one relay drains 3 writers' 1,500 events while `fault` strikes mid-drain.

    The relay must recover by itself (no restart) and drain everything; it is then stopped and the
    ledger read back. Returns the report for the caller to judge (and print).
    """
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=50, **settings)
    with Writers(engine, topic, threads=3, limit=1500) as writers:
        wait_until(lambda: states(engine).get("sent", 0) >= 200, 60, "publishing to start")
        fault()
        wait_until(writers.done, recover_within, "writers to finish")
    wait_until(lambda: pending(engine) == 0, recover_within, "the relay to recover and drain by itself")
    assert relay.alive, f"the relay died instead of recovering:\n{relay.log()[-3000:]}"
    relay.stop()
    report = ledger(engine, [topic])
    assert report.committed == len(writers.committed), report.summary()
    return report


def postgres_backends(engine: Engine, process: RelayProcess) -> int:
    """PostgreSQL backends serving this relay process: its TCP sockets to the server, matched by port.

    Linux only (/proc): the process's socket inodes, their local ports in /proc/PID/net/tcp, and
    pg_stat_activity's client_port. Counts what the server holds for it, whatever the relay names them.
    """
    assert process.process is not None
    pid, server_port = process.process.pid, engine.url.port or 5432
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(:ports)"),
                                {"ports": ports}).scalar_one())
