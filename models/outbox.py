"""The outbox table and the relay's own state tables.

Names follow two environment variables read once at import, so that models, migrations and
the relay always agree: ``OUTBOX_SCHEMA`` (Postgres schema, default ``outbox``) and
``OUTBOX_TABLE`` (the events table, default ``events``). The relay's tables live beside it.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import re
import uuid

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _identifier(env: str, default: str) -> str:
    value = os.environ.get(env, default)
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{env}={value!r} is not a plain lower-case SQL identifier ([a-z_][a-z0-9_]*, max 63)")
    return value


SCHEMA = _identifier("OUTBOX_SCHEMA", "outbox")
EVENTS_TABLE = _identifier("OUTBOX_TABLE", "events")
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


_UNSENT_STATES = ", ".join(f"'{state.value}'" for state in EventState if state is not EventState.SENT)


class Base(DeclarativeBase):
    metadata = MetaData(
        schema=SCHEMA,
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
        },
    )


class OutboxEvent(Base):
    """One event to publish. Application code writes it through ``relay.enqueue``."""

    __tablename__ = EVENTS_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), unique=True, server_default=text("gen_random_uuid()")
    )
    topic: Mapped[str] = mapped_column(Text)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    value: Mapped[bytes | None] = mapped_column(LargeBinary)  # None is a tombstone
    # Kafka headers are ordered, may repeat a name, and carry binary values: two parallel arrays.
    header_names: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    header_values: Mapped[list[bytes]] = mapped_column(ARRAY(LargeBinary), server_default=text("'{}'"))
    partition: Mapped[int | None] = mapped_column(Integer)
    lane_key: Mapped[int] = mapped_column(Integer, Computed(LANE_KEY_SQL, persisted=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))

    __table_args__ = (
        CheckConstraint(f"topic ~ '{TOPIC_PATTERN}' AND topic NOT IN ('.', '..')", name="topic_name"),
        CheckConstraint("partition >= 0", name="partition_non_negative"),
        CheckConstraint("cardinality(header_names) = cardinality(header_values)", name="headers_paired"),
    )


class UnsentEvent(Base):
    """An event not sent yet: pending, failed (parked) or discarded. The trigger ``ENQUEUE_TRIGGER``
    writes one row per inserted event; marking it sent deletes the row. Narrow on purpose: this
    table and its indexes are what claims walk and marks change."""

    __tablename__ = UNSENT_TABLE

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # the event's id
    lane_key: Mapped[int] = mapped_column(Integer)
    # NULL: due since it was written. A time: not before then (a delayed event, or one put back by retry).
    due_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(Text, server_default=text(f"'{EventState.PENDING.value}'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(f"state IN ({_UNSENT_STATES})", name="state_known"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # Delayed events by due time: a claim reads the ones due now, never those still waiting.
        Index(f"ix_{UNSENT_TABLE}_delayed", "due_at", "id",
              postgresql_where=text(f"state = 'pending' AND NOT ({READY_PREDICATE})")),
        # Failed rows hold back later rows of their key (same key, same lane_key); finding them stays cheap.
        Index(f"ix_{UNSENT_TABLE}_failed", "lane_key", "id", postgresql_where=text("state = 'failed'")),
        # Retention of discarded events, and status, without walking the backlog.
        Index(f"ix_{UNSENT_TABLE}_discarded", "id", postgresql_where=text("state = 'discarded'")),
    )


class SentBatch(Base):
    """One marked batch: which events (ids, in id order) were sent, and when. Status counts the
    last minute's, replay selects by time, retention deletes the oldest batches' events."""

    __tablename__ = SENT_TABLE

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    sent_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    first_id: Mapped[int] = mapped_column(BigInteger)
    last_id: Mapped[int] = mapped_column(BigInteger)
    ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))

    __table_args__ = (
        Index(f"ix_{SENT_TABLE}_sent_at", "sent_at"),
        # An event's batch: the one whose id range holds it and whose ids list it (lanes' ranges overlap).
        Index(f"ix_{SENT_TABLE}_id_range", text("int8range(first_id, last_id, '[]')"), postgresql_using="gist"),
    )


class RelayLane(Base):
    """Who publishes each lane. Ownership itself is a Postgres advisory lock; this row shows it."""

    __tablename__ = LANES_TABLE

    lane: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str | None] = mapped_column(Text)
    acquired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class RelaySettings(Base):
    """Single-row table of deployment-wide relay settings (the lane count)."""

    __tablename__ = SETTINGS_TABLE

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("1"))
    lane_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    # Set by `outbox-relay lanes set N` while it changes the count; relays step back meanwhile.
    resize_to: Mapped[int | None] = mapped_column(SmallInteger)
    # This outbox's durable identity, made once by `migrate`: part of the default Kafka names and of
    # every progress record, so two outboxes on one Kafka cluster never take each other's progress.
    outbox_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), server_default=text("gen_random_uuid()"))

    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint("lane_count BETWEEN 1 AND 1024", name="lane_count_range"),
    )


class RelayInstance(Base):
    """Live relay processes, so they can share the lanes evenly."""

    __tablename__ = INSTANCES_TABLE

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    # The instance's control session: it counts as live only while that backend exists, so a killed
    # instance stops counting at once instead of after its heartbeat times out.
    backend_pid: Mapped[int | None] = mapped_column(Integer)


metadata = Base.metadata
