"""Schema changes of the consumer inbox, as functions any Alembic history can call.

``outbox-relay inbox migrate`` runs them from the inbox's own history (its version table is
``<inbox schema>.outbox_inbox_version``). A consumer that has an Alembic history of its own adds one
revision instead::

    from outbox_relay.models.inbox_migration import create_inbox_v1, drop_inbox_v1

    def upgrade() -> None:
        create_inbox_v1()

    def downgrade() -> None:
        drop_inbox_v1()

Each function is frozen once released: later schema changes get new functions.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from outbox_relay.models.inbox import INBOX_SCHEMA, OFFSETS_TABLE, PARKED_TABLE, PROCESSED_TABLE


def create_inbox_v1() -> None:
    """Create the inbox schema: processed event ids, stored offsets, parked events."""
    op.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{INBOX_SCHEMA}"'))
    op.create_table(
        PROCESSED_TABLE,
        sa.Column("consumer_group", sa.Text, nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("consumer_group", "event_id", name=f"pk_{PROCESSED_TABLE}"),
        schema=INBOX_SCHEMA,
    )
    op.create_index(f"ix_{PROCESSED_TABLE}_processed_at", PROCESSED_TABLE, ["processed_at"], schema=INBOX_SCHEMA)
    op.create_table(
        OFFSETS_TABLE,
        sa.Column("consumer_group", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("consumer_group", "topic", "partition", name=f"pk_{OFFSETS_TABLE}"),
        schema=INBOX_SCHEMA,
    )
    op.create_table(
        PARKED_TABLE,
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), nullable=False),
        sa.Column("consumer_group", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=True),
        sa.Column("header_names", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("header_values", postgresql.ARRAY(sa.LargeBinary), nullable=False,
                  server_default=sa.text("'{}'")),
        sa.Column("timestamp_ms", sa.BigInteger, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("id", name=f"pk_{PARKED_TABLE}"),
        sa.UniqueConstraint("consumer_group", "topic", "partition", "offset", name=f"uq_{PARKED_TABLE}_position"),
        sa.CheckConstraint("state IN ('failed', 'retry', 'held')", name=f"ck_{PARKED_TABLE}_state_known"),
        schema=INBOX_SCHEMA,
    )
    op.create_index(f"ix_{PARKED_TABLE}_key", PARKED_TABLE, ["consumer_group", "topic", "partition", "key", "offset"],
                    schema=INBOX_SCHEMA)


def drop_inbox_v1() -> None:
    """Drop what ``create_inbox_v1`` created (the schema stays: it may hold other things)."""
    op.drop_table(PARKED_TABLE, schema=INBOX_SCHEMA)
    op.drop_table(OFFSETS_TABLE, schema=INBOX_SCHEMA)
    op.drop_table(PROCESSED_TABLE, schema=INBOX_SCHEMA)
