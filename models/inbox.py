"""The consumer inbox's tables: they live in the consumer's database, beside its own data.

A consumer database needs none of the outbox's tables. The schema is ``OUTBOX_INBOX_SCHEMA``
(default ``inbox``), read once at import like the outbox's names.

- ``processed``: one row per event applied by a consumer group (the de-duplication key), written in
  the same transaction as the handler's effects; retention deletes old rows in batches.
- ``offsets``: the next offset to read per (group, topic, partition), the consumer's source of truth.
- ``parked``: events whose handler kept failing (``failed``), those an operator put back (``retry``),
  and later events of the same key waiting behind them (``held``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from outbox_relay.models.names import _identifier

INBOX_SCHEMA = _identifier("OUTBOX_INBOX_SCHEMA", "inbox")
PROCESSED_TABLE = "processed"
OFFSETS_TABLE = "offsets"
PARKED_TABLE = "parked"
INBOX_VERSION_TABLE = "outbox_inbox_version"
PARKED_STATES = ("failed", "retry", "held")

inbox_metadata = MetaData(schema=INBOX_SCHEMA)

processed = Table(
    PROCESSED_TABLE, inbox_metadata,
    Column("consumer_group", Text, nullable=False),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("consumer_group", "event_id", name=f"pk_{PROCESSED_TABLE}"),
    Index(f"ix_{PROCESSED_TABLE}_processed_at", "processed_at"),
)

offsets = Table(
    OFFSETS_TABLE, inbox_metadata,
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("consumer_group", "topic", "partition", name=f"pk_{OFFSETS_TABLE}"),
)

parked = Table(
    PARKED_TABLE, inbox_metadata,
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=True),
    Column("header_names", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("header_values", ARRAY(LargeBinary), nullable=False, server_default=text("'{}'")),
    Column("timestamp_ms", BigInteger, nullable=True),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", Text, nullable=True),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("id", name=f"pk_{PARKED_TABLE}"),
    UniqueConstraint("consumer_group", "topic", "partition", "offset", name=f"uq_{PARKED_TABLE}_position"),
    CheckConstraint("state IN ('failed', 'retry', 'held')", name=f"ck_{PARKED_TABLE}_state_known"),
    Index(f"ix_{PARKED_TABLE}_key", "consumer_group", "topic", "partition", "key", "offset"),
)
