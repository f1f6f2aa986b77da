"""Connections to PostgreSQL, and its errors turned into the relay's own at this boundary.

Every query function of ``outbox_relay.db`` runs under :func:`translated`: a connection that
broke (or a statement cancelled by a timeout: ``StatementCancelled`` or ``LockTimeout``, kinds of it) raises
``DatabaseUnavailable``, anything else PostgreSQL refuses raises ``DatabaseError``; the psycopg
error stays as the cause. Nothing outside this package catches psycopg's exceptions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from outbox_relay.db.names import CHANNEL
from outbox_relay.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    LockTimeout,
    StatementCancelled,
)

Connection: TypeAlias = "psycopg.Connection[Any]"
_Class = TypeVar("_Class", bound=type)


def first_line(exc: BaseException) -> str:
    """libpq's message without its framing: 'connection to server at ... failed: FATAL:  database "x" ...'."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line.rsplit(" failed: ", 1)[-1].replace("FATAL:  ", "").strip()


def milliseconds(seconds: float) -> int:
    """A PostgreSQL timeout setting (whole milliseconds) for ``seconds``, rounded up: 0 would mean none."""
    return max(1, math.ceil(round(seconds * 1000, 6)))


# How often a statement that began after the deadline is cancelled again (one cancel between
# statements is lost: it finds nothing running), and how long the block's end waits for a cancel
# on its way.
_CANCEL_AGAIN_S = 0.05
_CANCEL_WAIT_S = 2.0
# Cancels unanswered for this long past the deadline: the backend is not running (stopped, a frozen
# VM) or the server cannot be reached to take them. The connection is given up: shut down under the
# statement, which then fails at once instead of waiting for a backend that may never run again.
_GIVE_UP_AFTER_S = 1.0


@contextlib.contextmanager
def cancelled_after(conn: Connection, seconds: float) -> Iterator[None]:
    """Cancel whatever ``conn`` runs once ``seconds`` have passed, until the block ends.

    statement_timeout bounds each statement; this bounds them together: a check made of several
    statements answers within its timeout, not within one timeout per statement. A cancelled
    statement raises ``StatementCancelled`` where it ran (under :func:`translated`). When cancels have
    not ended it within ``_GIVE_UP_AFTER_S``, the connection is given up: the block raises
    ``StatementCancelled`` too, and ``conn`` is closed.
    """
    done = threading.Event()
    gave_up = threading.Event()
    cancelling = threading.Lock()  # held while a cancel is on its way

    def cancel_until_done() -> None:
        if done.wait(seconds):
            return
        give_up_at = time.monotonic() + _GIVE_UP_AFTER_S
        while True:
            with cancelling:
                if done.is_set():
                    return
                left = give_up_at - time.monotonic()
                if left <= 0:
                    gave_up.set()
                    _shut_down(conn)
                    return
                # A frozen server leaves a cancel unanswered: waiting its full _CANCEL_WAIT_S put the
                # give-up 2 s past the deadline, not _GIVE_UP_AFTER_S.
                with contextlib.suppress(psycopg.Error):  # no server to take it: given up on next time
                    _cancel(conn, min(left, _CANCEL_WAIT_S))
            if done.wait(_CANCEL_AGAIN_S):
                return

    threading.Thread(target=cancel_until_done, name="outbox-relay cancel", daemon=True).start()
    try:
        yield
    except (psycopg.Error, DatabaseError) as exc:
        if not gave_up.is_set():
            raise
        raise StatementCancelled(f"PostgreSQL took no cancel within {seconds + _GIVE_UP_AFTER_S:g}s: "
                                 "gave the connection up") from exc
    finally:
        # A cancel on its way could hit a later statement: wait for it, though not for as long as
        # a cancel to a server that vanished takes (until TCP gives up connecting); a connection it
        # may still reach is closed.
        sent = cancelling.acquire(timeout=_CANCEL_WAIT_S)
        done.set()
        if sent:
            cancelling.release()
        if gave_up.is_set() or not sent:
            conn.close()  # also when the block ended just as it was given up: its socket is shut down


def _shut_down(conn: Connection) -> None:
    """End the connection under whatever waits on it: its read returns at once, as if the server had gone."""
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:  # shutdown acts on the socket, not the fd
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # already closed


def _cancel(conn: Connection, timeout: float = _CANCEL_WAIT_S) -> None:
    """A cancel that lets the process run while it is on its way: psycopg's binary ``cancel()`` holds the
    GIL in PQcancel, so a cancel to a postmaster that does not answer froze every thread (the 2 s bound
    of ``cancelled_after`` included) for as long as TCP kept it waiting. ``cancel_safe`` (psycopg 3.2,
    libpq 17) waits in Python, and gives up after ``timeout``."""
    cancel_safe = getattr(conn, "cancel_safe", None)
    if cancel_safe is None:
        conn.cancel()
    else:
        cancel_safe(timeout=timeout)


@contextlib.contextmanager
def translated(doing: str = "") -> Iterator[None]:
    """psycopg's errors as the relay's (usable as a decorator); ``doing`` prefixes the message.

    Errors that SQLAlchemy wraps (Alembic runs the migrations through it) are judged by psycopg's inside.
    """
    caught: tuple[type[BaseException], ...] = (psycopg.Error, *_sqlalchemy_errors())
    try:
        yield
    except caught as exc:
        cause = getattr(exc, "orig", exc)
        if isinstance(cause, psycopg.errors.QueryCanceled):  # an OperationalError too: callers may tell it apart
            raise StatementCancelled(f"{doing or 'PostgreSQL'}: {first_line(cause)}") from exc
        if isinstance(cause, psycopg.errors.LockNotAvailable):  # the same
            raise LockTimeout(f"{doing or 'PostgreSQL'}: {first_line(cause)}") from exc
        if isinstance(cause, psycopg.OperationalError):
            raise DatabaseUnavailable(f"{doing or 'PostgreSQL'}: {first_line(cause)}") from exc
        if isinstance(cause, psycopg.Error):
            raise DatabaseError(f"{doing or 'PostgreSQL refused'}: {first_line(cause)}") from exc
        raise


def is_unavailable(exc: BaseException) -> bool:
    """A lost or refused connection (psycopg's own, or one SQLAlchemy wraps): worth retrying as it is."""
    if isinstance(exc, _sqlalchemy_errors()):
        return (bool(getattr(exc, "connection_invalidated", False))
                or isinstance(getattr(exc, "orig", None), psycopg.OperationalError))
    return isinstance(exc, psycopg.OperationalError)


# psycopg's OperationalError also covers errors that are a statement's own fault, whoever runs it again:
# a value too long for a btree index (54000), a routine that raised (38000, 39000), a trigger's refusal
# (27000), currval before nextval (55000). These SQLSTATE classes are the database's trouble instead
# (connection, authentication, a transaction rolled back for contention, resources, an operator or a
# crash, the server's own system errors), and lock waits that timed out.
_OUTAGE_CLASSES = frozenset({"08", "28", "40", "53", "57", "58", "F0"})
_CONTENTION_STATES = frozenset({"55P03", "55006"})


def is_outage(exc: BaseException) -> bool:
    """Trouble of the database (or the way to it), not of the statement: waited out and tried again as it
    is, never counted against an event. A lost connection, or an OperationalError of those classes."""
    if not is_unavailable(exc):
        return False
    if getattr(exc, "connection_invalidated", False):
        return True
    cause = getattr(exc, "orig", exc)
    sqlstate = getattr(cause, "sqlstate", None)
    return sqlstate is None or sqlstate[:2] in _OUTAGE_CLASSES or sqlstate in _CONTENTION_STATES


def _sqlalchemy_errors() -> tuple[type[Exception], ...]:
    """SQLAlchemy's wrapper of driver errors, if SQLAlchemy is loaded at all: the daemon never loads it
    (its memory is not the daemon's to pay), and nothing can raise its errors then."""
    exc = sys.modules.get("sqlalchemy.exc")
    return (exc.DBAPIError,) if exc is not None else ()


def translate_errors(cls: _Class) -> _Class:
    """Class decorator: every public method (the named queries) runs under :func:`translated`."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(member, staticmethod):
            setattr(cls, name, staticmethod(translated()(member.__func__)))
        elif inspect.isfunction(member):
            setattr(cls, name, translated()(member))
    return cls


def conninfo(database_url: str) -> str:
    """A libpq connection URI from a SQLAlchemy URL (postgresql+psycopg://...), read as SQLAlchemy reads it.

    SQLAlchemy spells several hosts ``?host=a:5432&host=b:5433`` (its only multi-host form); libpq
    wants ``host=a,b&port=5432,5433``, so a primary and its standby are both tried.
    """
    parts = _split(database_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    hosts = [value for key, value in query if key == "host"]
    if any(":" in host for host in hosts):
        default_port = str(_port(parts) or 5432)
        pairs = [host.rpartition(":") if ":" in host else (host, "", "") for host in hosts]
        query = [(key, value) for key, value in query if key not in ("host", "port")]
        query += [("host", ",".join(name for name, _, _ in pairs)),
                  ("port", ",".join(port or default_port for _, _, port in pairs))]
    query.sort(key=lambda item: item[0])  # as SQLAlchemy renders it (stable: repeated keys keep their order)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def database_name(database_url: str) -> str:
    """The database the URL names, as SQLAlchemy's URL.database reads it ('' if none)."""
    return urllib.parse.unquote(_split(database_url).path[1:])


def masked(database_url: str) -> str:
    """The URL with its password replaced by ***, for logs and messages."""
    return _PASSWORD.sub(r"\1***@", database_url)


_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]+@")  # the password runs to the first '@', as below


def where(database_url: str) -> str:
    """host:port/database, for messages (no user, no password)."""
    parts = _split(database_url)
    return f"{parts.hostname or 'localhost'}:{_port(parts) or 5432}/{database_name(database_url)}"


def _split(database_url: str) -> urllib.parse.SplitResult:
    scheme, separator, rest = database_url.partition("://")
    if not separator or scheme.partition("+")[0] not in ("postgresql", "postgres"):
        raise ConfigurationError(f"{masked(database_url)!r} is not a PostgreSQL URL (postgresql+psycopg://user:password@host/database)")
    # Read the way SQLAlchemy's make_url reads it (the daemon used it before 0009): a password runs
    # to the first '@' and may hold '/', '?' or '#' unencoded, and a '#' is never a fragment. A
    # different reading changes the database name, and with it the default transactional.id prefix.
    userinfo = _USERINFO.match(rest)
    if userinfo:
        user, password = userinfo["user"], userinfo["password"]
        rest = (_quoted(user) + ("" if password is None else ":" + _quoted(password)) + "@"
                + rest[userinfo.end():])
    return urllib.parse.urlsplit(f"postgresql://{rest.replace('#', '%23')}")


# SQLAlchemy's URL pattern for user and password (sqlalchemy.engine.url._parse_url).
_USERINFO = re.compile(r"(?P<user>[^:/]*)(?::(?P<password>[^@]*))?@")


def _quoted(text: str) -> str:
    return urllib.parse.quote(urllib.parse.unquote(text), safe="")


def _port(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise ConfigurationError("the database URL's port is not a number from 0 to 65535") from None


# Session settings are SET after connecting rather than sent as the `options` startup parameter,
# which PgBouncer refuses.
# The relay's control writes are durable whatever the database's default (lanes relax it, below).
# The server also notices a vanished relay within seconds (and
# frees its lanes' locks).
_SESSION = ("SET synchronous_commit = on; SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
            " SET tcp_keepalives_count = 3")
# A lane's writes (its marks above all) commit without waiting for the WAL flush: a mark waited
# 10-15 ms for the disk on every tick, which set the lane's pace under a steady load, where Kafka's
# transaction takes 3 ms. It is safe because nothing depends on a mark being durable: a crash loses
# at most the newest marks (the WAL is lost from its end, so each lane loses its newest marks, never
# one between two kept ones), and the next owner's recovery reads the progress records back until a
# transaction whose rows are all marked, exactly as after a failover to an asynchronous standby
# (test_standby.py::test_postgres_crashed_in_immediate_mode_mid_drain, test_deployments.py::
# test_marks_lost_by_postgresql_over_many_transactions_are_recovered). Visibility does not wait for
# the flush: the next claim never sees a marked row.
# The claim must walk the pending index in id order and stop after one batch, whatever the planner
# thinks of `lane_key % n = lane` (it cannot estimate it, and on a fresh table it has no statistics
# at all): a bitmap scan + sort would read the whole backlog on every claim. No statement or lock
# wait of a lane may hang it (a claim or mark takes milliseconds). The claim's final sort of at
# most two batches carries enable_sort's penalty, which would make its cost look worth JIT
# compiling (close to a second per claim): a query of milliseconds never is.
_LANE_SESSION = ("SET synchronous_commit = off; SET enable_bitmapscan = off; SET enable_sort = off; SET jit = off;"
                 " SET statement_timeout = 30000; SET lock_timeout = 10000")


def connect(database_url: str, application_name: str = "outbox-relay", *, lane: bool = False) -> Connection:
    """An autocommit connection: each statement is its own short transaction.

    TCP keepalives make a dead peer visible in seconds rather than hours, on both sides. A server
    that cannot be reached raises ``DatabaseUnavailable`` naming it.
    """
    doing = f"cannot connect to PostgreSQL at {where(database_url)}"
    with translated(doing):
        conn = psycopg.connect(
            conninfo(database_url),
            autocommit=True,
            application_name=application_name,
            connect_timeout=5,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            row_factory=tuple_row,
        )
    try:
        with translated(doing):
            conn.execute(_SESSION)
            if lane:
                conn.execute(_LANE_SESSION)
    except BaseException:
        conn.close()
        raise
    return conn


class HeldConnection:
    """A connection kept across runs of a job: opened when next needed, forgotten when it broke.

    ``with held.use() as conn:`` opens it if it is not open; a ``DatabaseUnavailable`` inside
    closes and forgets it (and propagates), so the next use connects again.
    """

    def __init__(self, database_url: str, application_name: str, session: str = "") -> None:
        self.database_url = database_url
        self.application_name = application_name
        self.session = session  # SET statements for the session, run once each time it connects
        self._conn: Connection | None = None
        self._lock = threading.RLock()  # jobs run on the scheduler's threads

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @contextlib.contextmanager
    def use(self) -> Iterator[Connection]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    conn = connect(self.database_url, self.application_name)
                    try:
                        if self.session:
                            with translated():
                                conn.execute(self.session)
                    except BaseException:
                        conn.close()
                        raise
                    self._conn = conn  # only with its session set
                yield self._conn
            except DatabaseUnavailable:
                self._forget()
                raise

    def close(self) -> None:
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def listen(conn: Connection) -> None:
    """Receive the outbox's commit notifications on this connection."""
    with translated():
        conn.execute(sql.SQL("LISTEN {}").format(CHANNEL))


def notifications(conn: Connection, timeout: float) -> Iterator[None]:
    """One item per notification received within ``timeout`` seconds."""
    with translated():
        for _ in conn.notifies(timeout=timeout):
            yield None
