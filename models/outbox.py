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
# Prefix of the lane index ((lane_key % N), id) WHERE pending: one per lane count, made by
# migrations and `outbox-relay lanes set`, not declared here because N lives in the database.
LANE_INDEX_PREFIX = f"ix_{EVENTS_TABLE}_lane_"
# Since 0008 the claim walks ((lane_key % N), id) WHERE pending AND ready instead: delayed events
# (due later than they were written) are not in it, so they cost a claim nothing until they are due.
READY_INDEX_PREFIX = f"ix_{EVENTS_TABLE}_ready_lane_"
READY_PREDICATE = "available_at <= created_at"
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
    SENT = "sent"
    FAILED = "failed"
    DISCARDED = "discarded"


_STATES = ", ".join(f"'{state.value}'" for state in EventState)


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
    state: Mapped[str] = mapped_column(Text, server_default=text(f"'{EventState.PENDING.value}'"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(f"topic ~ '{TOPIC_PATTERN}' AND topic NOT IN ('.', '..')", name="topic_name"),
        CheckConstraint("partition >= 0", name="partition_non_negative"),
        CheckConstraint(f"state IN ({_STATES})", name="state_known"),
        CheckConstraint("cardinality(header_names) = cardinality(header_values)", name="headers_paired"),
        CheckConstraint("(state = 'sent') = (sent_at IS NOT NULL)", name="sent_at_iff_sent"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # The relay's claim walks this index in id order: its size is the backlog, not the table.
        Index(f"ix_{EVENTS_TABLE}_pending", "id", postgresql_where=text("state = 'pending'")),
        # Failed rows hold back later rows of their key; looking them up must stay cheap.
        Index(f"ix_{EVENTS_TABLE}_failed_key", "key", "id", postgresql_where=text("state = 'failed'")),
        # Retention deletes sent rows oldest first; status counts the last minute's.
        Index(f"ix_{EVENTS_TABLE}_sent_at", "sent_at", postgresql_where=text("state = 'sent'")),
        # Delayed events by due time: a claim reads the ones due now, never those still waiting.
        Index(f"ix_{EVENTS_TABLE}_delayed", "available_at", "id",
              postgresql_where=text(f"state = 'pending' AND NOT ({READY_PREDICATE})")),
        # Retention of discarded rows, without walking the whole table.
        Index(f"ix_{EVENTS_TABLE}_discarded", "created_at", postgresql_where=text("state = 'discarded'")),
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
