"""Is the outbox schema there, and as recent as this relay needs? One cheap check, one line of advice.

Every command runs it before it works, whoever owns the migrations:

- **Structure**, compared with what the models declare (``REQUIRED``, kept equal to them by a unit
  test: a table, column or index a new release declares is required as soon as it is declared),
  plus what the models cannot declare: the commit and
  enqueue triggers and the ready lane index of the current lane count. A handful of catalog reads,
  whatever the table's size.
- **Revision**: when ``outbox-relay migrate`` manages the schema, its version table must be at this
  release's head (a migration may change data, not only structure). An application that runs the
  migration functions from its own Alembic history has no such table; the structure speaks for it.
"""

from __future__ import annotations

import logging

from outbox_relay.db import catalog
from outbox_relay.db.connection import Connection
from outbox_relay.db.names import ENQUEUE_TRIGGER, NOTIFY_TRIGGER
from outbox_relay.errors import SchemaError
from outbox_relay.models.names import (
    EVENTS_READY_INDEX_PREFIX,
    EVENTS_TABLE,
    IDLE_LANES_TABLE,
    INSTANCES_TABLE,
    LANE_INDEX_PREFIX,
    LANES_TABLE,
    READY_INDEX_PREFIX,
    SCHEMA,
    SENT_TABLE,
    SETTINGS_TABLE,
    UNSENT_TABLE,
)

# The revision at this release's head, and each table's columns and indexes as the models declare
# them: spelled out so that the check runs without loading SQLAlchemy or Alembic into the daemon.
# tests/unit/test_schema_manifest.py keeps both equal to the models and the migration history.
HEAD_REVISION = "0012_lane_kafka_names"
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    EVENTS_TABLE: (("id", "event_id", "topic", "key", "value", "header_names", "header_values", "partition",
                    "lane_key", "created_at", "available_at"), ()),
    UNSENT_TABLE: (("id", "lane_key", "due_at", "state", "attempts", "last_error"),
                   (f"ix_{UNSENT_TABLE}_delayed", f"ix_{UNSENT_TABLE}_failed", f"ix_{UNSENT_TABLE}_discarded")),
    SENT_TABLE: (("id", "sent_at", "first_id", "last_id", "ids"),
                 (f"ix_{SENT_TABLE}_sent_at", f"ix_{SENT_TABLE}_id_range")),
    LANES_TABLE: (("lane", "owner", "acquired_at", "heartbeat_at", "transactional_id", "progress_topic"), ()),
    SETTINGS_TABLE: (("id", "lane_count", "resize_to", "outbox_id"), ()),
    INSTANCES_TABLE: (("name", "started_at", "heartbeat_at", "backend_pid"), ()),
    IDLE_LANES_TABLE: (("lane", "since"), ()),
}

# Which migration function adds what, for applications that own their Alembic history.
_ADDED_BY = {
    f"table {SCHEMA}.{EVENTS_TABLE}_instances": "add_scale_out_v2",
    f"column {SETTINGS_TABLE}.resize_to": "add_scale_out_v2",
    f"trigger {NOTIFY_TRIGGER}": "add_commit_notify_v3",
    f"index ix_{EVENTS_TABLE}_discarded": "add_discarded_index_v4",
    "lane index": "add_lane_index_v5",
    f"column {SETTINGS_TABLE}.outbox_id": "add_outbox_identity_v6",
    f"column {EVENTS_TABLE}_instances.backend_pid": "add_instance_sessions_v7",
    f"index ix_{EVENTS_TABLE}_delayed": "add_claim_indexes_v8",
    "ready lane index": "add_claim_indexes_v8",
    f"table {SCHEMA}.{UNSENT_TABLE}": "add_unsent_table_v9",
    f"table {SCHEMA}.{SENT_TABLE}": "add_unsent_table_v9",
    f"trigger {ENQUEUE_TRIGGER}": "add_unsent_table_v9",
    "unsent ready lane index": "add_unsent_table_v9",
    f"table {SCHEMA}.{IDLE_LANES_TABLE}": "add_idle_lanes_v11",
    f"column {LANES_TABLE}.transactional_id": "add_lane_kafka_names_v12",
    f"column {LANES_TABLE}.progress_topic": "add_lane_kafka_names_v12",
}



def problems(conn: Connection) -> list[str]:
    """What is missing or behind, as short phrases; empty when the schema is what this relay needs."""
    columns = catalog.columns(conn)
    if EVENTS_TABLE not in columns:
        return [f"no outbox: schema {SCHEMA!r} has no table {EVENTS_TABLE!r}"]
    missing: list[str] = []
    for table, (table_columns, _) in REQUIRED.items():
        if table not in columns:
            missing.append(f"table {SCHEMA}.{table}")
            continue
        missing += [f"column {table}.{column}" for column in table_columns if column not in columns[table]]
    indexes = catalog.indexes(conn)
    for table, (_, table_indexes) in REQUIRED.items():  # a missing table's indexes go without saying
        if table in columns:
            missing += [f"index {index}" for index in table_indexes if index not in indexes]
    missing += [f"trigger {name}" for name in (NOTIFY_TRIGGER, ENQUEUE_TRIGGER) if not catalog.has_trigger(conn, name)]
    if SETTINGS_TABLE in columns:
        if catalog.lane_count(conn) is None:
            missing.append(f"the row of {SCHEMA}.{SETTINGS_TABLE}")
        elif not any(name.startswith(READY_INDEX_PREFIX) for name in indexes):
            # v5's lane index, then v8's, then v9's on the unsent table: say which functions are missing.
            if not any(name.startswith(EVENTS_READY_INDEX_PREFIX) for name in indexes):
                if not any(name.startswith(LANE_INDEX_PREFIX) for name in indexes):
                    missing.append("lane index")
                missing.append("ready lane index")
            missing.append("unsent ready lane index")
    if missing:
        return missing
    managed, current = catalog.managed_revision(conn)
    if managed and current != HEAD_REVISION:
        if _number(current) > _number(HEAD_REVISION):
            return [f"{NEWER}revision {current}, this relay knows up to {HEAD_REVISION}"]
        return [f"revision {current or '(none)'}, this relay needs {HEAD_REVISION}"]
    return []


NEWER = "newer: "  # marks the one problem `migrate` cannot fix


def _number(revision: str | None) -> int:
    """A revision's place in the history: every revision id starts with its number (0010_autovacuum)."""
    digits = (revision or "").partition("_")[0]
    return int(digits) if digits.isdigit() else -1


def disabled_triggers(conn: Connection, *, listening: bool) -> list[tuple[int, str]]:
    """What a trigger that exists but was disabled (ALTER TABLE ... DISABLE TRIGGER) means: a logging
    level and one line each."""
    found = []
    table = f"{SCHEMA}.{EVENTS_TABLE}"
    if not catalog.trigger_fires(conn, ENQUEUE_TRIGGER):
        found.append((logging.ERROR, f"trigger {ENQUEUE_TRIGGER} on {table} is disabled: events written now never "
                      f"become pending and are never published (ALTER TABLE {table} ENABLE TRIGGER "
                      f"{ENQUEUE_TRIGGER}; `outbox-relay verify` lists those written meanwhile)"))
    if listening and not catalog.trigger_fires(conn, NOTIFY_TRIGGER):
        found.append((logging.WARNING, f"trigger {NOTIFY_TRIGGER} on {table} is disabled: commits wake no relay, "
                      "lanes find new events every OUTBOX_POLL_INTERVAL (OUTBOX_LISTEN=off saves the idle "
                      "LISTEN connection)"))
    return found


def check(conn: Connection) -> None:
    """Raise SchemaError, in one line saying what to run, unless the schema is what this relay needs."""
    found = problems(conn)
    if not found:
        return
    if found[0].startswith("no outbox"):
        raise SchemaError(f"{found[0]} in this database: run `outbox-relay migrate` (or check --database-url, "
                          "OUTBOX_SCHEMA and OUTBOX_TABLE)")
    if found[0].startswith(NEWER):  # a later release migrated the database: Alembic here cannot go back
        raise SchemaError(f"the outbox schema is newer than this relay ({found[0].removeprefix(NEWER)}): upgrade"
                          " outbox-relay to the release that migrated it")
    functions = sorted({_ADDED_BY[item] for item in found if item in _ADDED_BY})
    own_history = (f"; if your application's Alembic history owns the outbox, add a revision calling "
                   f"outbox_relay.models.migration.{'(), '.join(functions)}()" if functions else "")
    raise SchemaError(f"the outbox schema is behind this relay ({', '.join(found)}): run `outbox-relay migrate`"
                      f"{own_history}")
