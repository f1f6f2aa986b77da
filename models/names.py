"""The outbox's names and SQL constants, without SQLAlchemy: what the relay daemon needs of the models.

Names follow two environment variables read once at import, so that models, migrations and
the relay always agree: ``OUTBOX_SCHEMA`` (Postgres schema, default ``outbox``) and
``OUTBOX_TABLE`` (the events table, default ``events``). The relay's tables live beside it.
The daemon imports this module and never the ORM models (``outbox_relay.models.outbox``): a
process that only relays does not pay for SQLAlchemy's memory.
"""

from __future__ import annotations

import enum
import os
import re

from outbox_relay.errors import ConfigurationError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _identifier(env: str, default: str, max_length: int = 63) -> str:
    value = os.environ.get(env, default)
    if not _IDENTIFIER.match(value):
        raise ConfigurationError(f"{env}={value!r} is not a plain lower-case SQL identifier ([a-z_][a-z0-9_]*, max 63)")
    if len(value) > max_length:
        raise ConfigurationError(f"{env}={value!r} is {len(value)} characters; at most {max_length}: PostgreSQL"
                                 " cuts names at 63 and the longest name made from it (its ready lane index)"
                                 " would be cut")
    return value


# The longest name made from the events table's: ix_<table>_unsent_ready_lane_1024.
MAX_TABLE_NAME = 63 - len("ix__unsent_ready_lane_1024")


SCHEMA = _identifier("OUTBOX_SCHEMA", "outbox")
EVENTS_TABLE = _identifier("OUTBOX_TABLE", "events", MAX_TABLE_NAME)
LANES_TABLE = f"{EVENTS_TABLE}_lanes"
SETTINGS_TABLE = f"{EVENTS_TABLE}_settings"
INSTANCES_TABLE = f"{EVENTS_TABLE}_instances"
# Since 0009 the events table is written once and never updated: what is still to do lives in a
# narrow table beside it (one row per event not sent: pending, failed or discarded), filled by a
# trigger on insert, and what was sent in a table of sent batches. Marking a batch sent deletes
# its narrow rows and writes one batch row, instead of rewriting every ~600-byte event row.
UNSENT_TABLE = f"{EVENTS_TABLE}_unsent"
SENT_TABLE = f"{EVENTS_TABLE}_sent"
ENQUEUE_TRIGGER = f"{EVENTS_TABLE}_enqueue"
# Since 0011 commits notify only while a lane sleeps: a lane with nothing to claim for a moment puts
# its row here; the wake-up trigger notifies while any row exists.
IDLE_LANES_TABLE = f"{EVENTS_TABLE}_idle_lanes"
# A view for people: the events table as it was before 0009 (each event with its state, attempts
# while unsent, last error, due time and, for sent ones, when). Made by the migration; the relay
# never reads it.
STATE_VIEW = f"{EVENTS_TABLE}_state"
# Prefix of the index each lane's claim walks: ((lane_key % N), id) of the ready pending rows, one
# per lane count, made by migrations and `outbox-relay lanes set`, not declared here because N
# lives in the database. Delayed events (due later than they were written) are not in it, so they
# cost a claim nothing until they are due.
READY_INDEX_PREFIX = f"ix_{UNSENT_TABLE}_ready_lane_"
READY_PREDICATE = "due_at IS NULL"
# The lane indexes of earlier releases, on the events table itself (v5, then v8's ready index).
LANE_INDEX_PREFIX = f"ix_{EVENTS_TABLE}_lane_"
EVENTS_READY_INDEX_PREFIX = f"ix_{EVENTS_TABLE}_ready_lane_"
# LISTEN/NOTIFY channel that wakes relays when events commit (one notification per transaction).
NOTIFY_CHANNEL = f"{SCHEMA}.{EVENTS_TABLE}"

# Kafka's topic rule (kafka.common.internals.Topic): 1-249 of [a-zA-Z0-9._-], and not "." or "..".
TOPIC_PATTERN = r"^[a-zA-Z0-9._-]{1,249}$"

# The lane key is a stable 31-bit hash: md5 of the key, or of the event id for events without a key
# (so those spread evenly). lane = lane_key % lane_count. Computed by Postgres, so rows inserted
# with raw SQL get the same lane as rows written through the API.
LANE_KEY_SQL = (
    "(('x' || substr(md5(CASE WHEN key IS NULL THEN uuid_send(event_id) ELSE key END), 1, 8))"
    "::bit(32)::integer & 2147483647)"
)


class EventState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"  # no row in the unsent table: its batch is in the sent table
    FAILED = "failed"
    DISCARDED = "discarded"
