"""Run the outbox's Alembic history programmatically (``outbox-relay migrate``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic.config import Config

from alembic import command
from outbox_relay.db import catalog
from outbox_relay.db.connection import Connection, translated
from outbox_relay.errors import ConfigurationError


def script_location() -> str:
    """The outbox's Alembic folder (alembic/ in the repository), installed as outbox_relay.migrations."""
    spec = importlib.util.find_spec("outbox_relay.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").exists():
                return str(location)
    raise ConfigurationError("the outbox migrations were not found; reinstall outbox-relay")


def alembic_config(database_url: str, *, lanes: int | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["url"] = database_url
    if lanes is not None:
        config.attributes["lanes"] = lanes
    return config


@translated()
def upgrade(database_url: str, revision: str = "head", *, lanes: int | None = None) -> None:
    """Upgrade the database to ``revision``; ``lanes`` sets the lane count when the table is created."""
    command.upgrade(alembic_config(database_url, lanes=lanes), revision)


@translated()
def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


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
