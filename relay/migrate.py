"""Run the outbox's Alembic history programmatically (``outbox-relay migrate``)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

from alembic.config import Config

from alembic import command
from outbox_relay.db import catalog
from outbox_relay.db.connection import Connection, connect, milliseconds, translated
from outbox_relay.errors import ConfigurationError, LockTimeout, MigrationBlocked


def script_location() -> str:
    """The outbox's Alembic folder (alembic/ in the repository), installed as outbox_relay.migrations."""
    spec = importlib.util.find_spec("outbox_relay.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").exists():
                return str(location)
    raise ConfigurationError("the outbox migrations were not found; reinstall outbox-relay")


def alembic_config(database_url: str, *, lanes: int | None = None, lock_timeout: float | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["url"] = database_url
    if lanes is not None:
        config.attributes["lanes"] = lanes
    if lock_timeout is not None:
        config.attributes["lock_timeout_ms"] = milliseconds(lock_timeout)
    return config


def upgrade(database_url: str, revision: str = "head", *, lanes: int | None = None,
            lock_timeout: float | None = None) -> None:
    """Upgrade the database to ``revision``; ``lanes`` sets the lane count when the table is created.
    ``lock_timeout``: give up rather than wait longer for a table lock."""
    with _lock_wait_named(database_url, lock_timeout):
        command.upgrade(alembic_config(database_url, lanes=lanes, lock_timeout=lock_timeout), revision)


def upgrade_sql(database_url: str, revision: str = "head", *, lanes: int | None = None) -> str:
    """The SQL that ``upgrade`` would run on this database, from its current revision: the script a DBA
    reviews and runs (``psql -f``) where schema changes go through review."""
    with connect(database_url, "outbox-relay migrate") as conn:
        managed, current = catalog.managed_revision(conn)
        exists = catalog.lane_count(conn) is not None
    if exists and not managed:
        raise ConfigurationError("this outbox has no `outbox-relay migrate` version table: your application's own"
                                 " Alembic history manages it (`alembic upgrade head --sql` writes its SQL)")
    config = alembic_config(database_url, lanes=lanes)
    config.output_buffer = script = io.StringIO()
    with translated():
        command.upgrade(config, f"{current}:{revision}" if current else revision, sql=True)
    return script.getvalue()


def downgrade(database_url: str, revision: str, *, lock_timeout: float | None = None) -> None:
    with _lock_wait_named(database_url, lock_timeout):
        command.downgrade(alembic_config(database_url, lock_timeout=lock_timeout), revision)


@contextlib.contextmanager
def _lock_wait_named(database_url: str, lock_timeout: float | None) -> Iterator[None]:
    """A migration that gave up waiting for a lock names who holds the outbox's tables. Each revision
    is re-runnable from where such a stop left it (0009 commits its first part before it locks)."""
    try:
        with translated():
            yield
    except LockTimeout:
        with connect(database_url, "outbox-relay migrate") as conn:
            holders = catalog.lock_holders(conn, waited_s=lock_timeout or 0.0)
        waited = f" {lock_timeout:g}s" if lock_timeout else ""
        raise MigrationBlocked(
            f"migrate gave up waiting{waited} for a lock on the outbox's tables (held by"
            f" {', '.join(holders) or 'a session that has ended since'}); while it waits, every writer of the"
            " outbox waits behind it. Run it again when that transaction has ended, or raise --lock-timeout"
        ) from None


def current_lane_count(conn: Connection) -> int | None:
    """The lane count of an existing outbox, or None when there is no outbox yet."""
    return catalog.lane_count(conn)


def drops_outbox(conn: Connection, revision: str) -> bool:
    """Whether downgrading to ``revision`` ("base", or "-N" from the current one) drops the events table."""
    from alembic.script import ScriptDirectory

    if current_lane_count(conn) is None:
        return False  # nothing to drop
    if revision == "base":
        return True
    if not revision.startswith("-") or not revision[1:].isdigit():
        return False
    managed, revision_now = catalog.managed_revision(conn)
    if not managed:
        return False  # not managed by `outbox-relay migrate`: Alembic refuses relative steps anyway
    script = ScriptDirectory(script_location())
    current = script.get_revision(revision_now) if revision_now else None
    for _ in range(int(revision[1:])):
        if current is None:
            return True
        down = current.down_revision
        current = script.get_revision(down) if isinstance(down, str) else None
    return current is None


def inbox_script_location() -> str:
    """The consumer inbox's Alembic folder (alembic/inbox/), a history of its own."""
    location = Path(script_location()) / "inbox"
    if not (location / "env.py").exists():
        raise ConfigurationError("the inbox migrations were not found; reinstall outbox-relay")
    return str(location)


def upgrade_inbox(database_url: str, revision: str = "head") -> None:
    """Create or upgrade the consumer inbox's tables in the consumer's database."""
    config = Config()
    config.set_main_option("script_location", inbox_script_location())
    config.attributes["url"] = database_url
    command.upgrade(config, revision)


def downgrade_inbox(database_url: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", inbox_script_location())
    config.attributes["url"] = database_url
    command.downgrade(config, revision)
