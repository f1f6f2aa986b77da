"""The relay's tables, locks and channel as PostgreSQL sees them, built once from the configured names.

``OUTBOX_SCHEMA`` and ``OUTBOX_TABLE`` are read by ``outbox_relay.models`` (which the write API's
SQLAlchemy model uses too); every query of the relay takes its identifiers from here.
"""

from __future__ import annotations

import zlib

from psycopg import sql

from outbox_relay import models

SCHEMA, EVENTS_TABLE = models.SCHEMA, models.EVENTS_TABLE
EVENTS = sql.Identifier(SCHEMA, EVENTS_TABLE)
UNSENT = sql.Identifier(SCHEMA, models.UNSENT_TABLE)  # one row per event not sent (pending, failed, discarded)
SENT = sql.Identifier(SCHEMA, models.SENT_TABLE)  # one row per marked batch
LANES = sql.Identifier(SCHEMA, models.LANES_TABLE)
SETTINGS = sql.Identifier(SCHEMA, models.SETTINGS_TABLE)
INSTANCES = sql.Identifier(SCHEMA, models.INSTANCES_TABLE)
IDLE_LANES = sql.Identifier(SCHEMA, models.IDLE_LANES_TABLE)  # lanes asleep: while any is, commits notify
CHANNEL = sql.Identifier(models.NOTIFY_CHANNEL)
NOTIFY_TRIGGER = f"{EVENTS_TABLE}_notify"  # the trigger that notifies CHANNEL at commit
ENQUEUE_TRIGGER = models.ENQUEUE_TRIGGER  # the trigger that writes an unsent row for each inserted event
VERSION_TABLE = "outbox_relay_version"  # the outbox's own Alembic version table (alembic/env.py)
VERSION = sql.Identifier(SCHEMA, VERSION_TABLE)
# to_regclass() takes text: the quoted, qualified names.
SETTINGS_REGCLASS = f'"{SCHEMA}"."{models.SETTINGS_TABLE}"'
VERSION_REGCLASS = f'"{SCHEMA}"."{VERSION_TABLE}"'

# Advisory locks are per database; the class id keeps two outbox tables in one database apart.
LOCK_CLASS = zlib.crc32(f"{SCHEMA}.{EVENTS_TABLE}".encode()) & 0x7FFFFFFF
# Held by `outbox-relay lanes set` while it changes the lane count (lanes use 0..1023).
RESIZE_LOCK = 1_000_000


def lane_index_name(lanes: int) -> str:
    """The index each lane's claim walks under this lane count (its ready, pending unsent rows; v9)."""
    return f"{models.READY_INDEX_PREFIX}{lanes}"
