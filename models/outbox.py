"""The outbox table and the relay's own state tables, as SQLAlchemy models.

Their names come from ``outbox_relay.models.names`` (``OUTBOX_SCHEMA``, ``OUTBOX_TABLE``).
"""

from __future__ import annotations

import datetime as dt
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

from outbox_relay.models.names import (
    EVENTS_TABLE,
    IDLE_LANES_TABLE,
    INSTANCES_TABLE,
    LANE_KEY_SQL,
    LANES_TABLE,
    READY_PREDICATE,
    SCHEMA,
    SENT_TABLE,
    SETTINGS_TABLE,
    TOPIC_PATTERN,
    UNSENT_TABLE,
    EventState,
)

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
    # The Kafka names its owner publishes under: the next owner settles that owner's work under them.
    transactional_id: Mapped[str | None] = mapped_column(Text)
    progress_topic: Mapped[str | None] = mapped_column(Text)


class IdleLane(Base):
    """A lane asleep until the next commit wakes it: while any row exists, commits notify the relays."""

    __tablename__ = IDLE_LANES_TABLE

    lane: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    since: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


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
