"""Run the outbox's Alembic history programmatically (``outbox-relay migrate``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic.config import Config

from alembic import command
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


def upgrade(database_url: str, revision: str = "head", *, lanes: int | None = None) -> None:
    """Upgrade the database to ``revision``; ``lanes`` sets the lane count when the table is created."""
    command.upgrade(alembic_config(database_url, lanes=lanes), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)
