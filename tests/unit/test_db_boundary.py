"""The PostgreSQL boundary (`outbox_relay.db`): its errors are the relay's own, and it is the only door.

No server is needed: the translation is judged on psycopg's exception classes, the door on the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from sqlalchemy.exc import ProgrammingError as SQLAlchemyProgrammingError

from outbox_relay.db import connection
from outbox_relay.db.connection import connect, translate_errors, translated
from outbox_relay.errors import ConnectionTrouble, DatabaseError, DatabaseUnavailable, OutboxError, StatementCancelled

RELAY = Path(__file__).resolve().parent.parent.parent / "relay"


@pytest.mark.parametrize(("raised", "expected", "message"), [
    (psycopg.OperationalError("server closed the connection unexpectedly"), DatabaseUnavailable,
     "PostgreSQL: server closed the connection unexpectedly"),
    # still a DatabaseUnavailable (lanes reconnect after it), but one the backlog job can name
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), StatementCancelled,
     "PostgreSQL: canceling statement due to statement timeout"),
    (psycopg.errors.RaiseException("a trigger refused the mark"), DatabaseError,
     "PostgreSQL refused: a trigger refused the mark"),
    (SQLAlchemyOperationalError("ALTER TABLE", {}, psycopg.OperationalError("the server went away")),
     DatabaseUnavailable, "PostgreSQL: the server went away"),
    (SQLAlchemyProgrammingError("CREATE TABLE", {}, psycopg.errors.InsufficientPrivilege(
        "permission denied for schema outbox")), DatabaseError,
     "PostgreSQL refused: permission denied for schema outbox"),
])
def test_postgresql_errors_become_the_relays_own(raised: Exception, expected: type[Exception], message: str) -> None:
    with pytest.raises(expected) as caught, translated():
        raise raised
    assert type(caught.value) is expected and str(caught.value) == message
    assert caught.value.__cause__ is raised  # the driver's error stays visible as the cause
    if isinstance(raised, psycopg.OperationalError):
        assert isinstance(caught.value, DatabaseUnavailable)


@pytest.mark.parametrize(("raised", "outage"), [
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),  # libpq's: no SQLSTATE
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
    (psycopg.errors.DeadlockDetected("deadlock detected"), True),
    (psycopg.errors.DiskFull("could not extend file"), True),
    (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), True),
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), True),
    (SQLAlchemyOperationalError("INSERT", {}, psycopg.errors.CannotConnectNow("the database system is starting up")),
     True),
    # the statement's own fault, however often it runs again
    (psycopg.errors.ProgramLimitExceeded("index row requires 40016 bytes, maximum size is 8191"), False),
    (SQLAlchemyOperationalError("INSERT", {}, psycopg.errors.ProgramLimitExceeded("index row size exceeds")), False),
    (psycopg.errors.ObjectNotInPrerequisiteState("currval of sequence is not yet defined in this session"), False),
    (psycopg.errors.ExternalRoutineException("a routine raised"), False),
    (psycopg.errors.RaiseException("a trigger refused"), False),
])
def test_an_outage_is_the_databases_trouble_not_the_statements(raised: Exception, outage: bool) -> None:
    """What the inbox waits out without counting an attempt: a lost connection or the database's own trouble,
    never an error the same statement would meet again (that stalled a consumer for ever)."""
    assert connection.is_outage(raised) is outage


def test_the_error_tree() -> None:
    # Callers catch DatabaseUnavailable to back off and DatabaseError for anything PostgreSQL said.
    assert issubclass(DatabaseUnavailable, ConnectionTrouble) and issubclass(DatabaseUnavailable, DatabaseError)
    assert issubclass(DatabaseError, OutboxError) and not issubclass(DatabaseError, ConnectionTrouble)


def test_other_errors_pass_through_untouched() -> None:
    with pytest.raises(LookupError), translated():
        raise LookupError("no settings row")


def test_named_queries_of_a_class_are_translated() -> None:
    @translate_errors
    class Queries:
        @staticmethod
        def lost(conn: object) -> None:
            raise psycopg.OperationalError("connection refused")

        def refused(self, conn: object) -> None:
            raise psycopg.errors.UniqueViolation("duplicate key")

    with pytest.raises(DatabaseUnavailable):
        Queries.lost(None)
    with pytest.raises(DatabaseError, match="duplicate key"):
        Queries().refused(None)


def test_an_unreachable_server_is_named_in_one_line() -> None:
    # Port 1 on localhost refuses at once: no server needed to see the message.
    with pytest.raises(DatabaseUnavailable) as caught:
        connect("postgresql+psycopg://nobody:secret@127.0.0.1:1/shop")
    text = str(caught.value)
    assert text.startswith("cannot connect to PostgreSQL at 127.0.0.1:1/shop: ") and "\n" not in text
    assert "secret" not in text


def test_only_the_boundary_imports_psycopg() -> None:
    outside = []
    for path in sorted(RELAY.rglob("*.py")):
        if path.parent.name == "db":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            outside += [f"{path.relative_to(RELAY)}: {name}" for name in names if name.split(".")[0] == "psycopg"]
    assert outside == []


class _FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_held_connection_is_opened_when_needed_and_forgotten_when_it_broke(
        monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[_FakeConnection] = []

    def fake_connect(_url: str, _name: str) -> _FakeConnection:
        opened.append(_FakeConnection())
        return opened[-1]

    monkeypatch.setattr(connection, "connect", fake_connect)
    held = connection.HeldConnection("postgresql+psycopg://u@h/db", "outbox-relay control")
    assert not held.is_open
    with held.use() as first, held.use() as again:
        assert first is again is opened[0]  # kept across uses
    with pytest.raises(DatabaseUnavailable), held.use():
        raise DatabaseUnavailable("PostgreSQL: server closed the connection unexpectedly")
    assert opened[0].closed and not held.is_open
    with pytest.raises(DatabaseError), held.use():
        raise DatabaseError("PostgreSQL refused: permission denied")
    assert held.is_open and len(opened) == 2  # a refused statement leaves the connection as it is
    with held.use() as conn:
        assert conn is opened[1]
    held.close()
    assert opened[1].closed and not held.is_open
