"""Marks stop rewriting events: a narrow table of unsent events and a table of sent batches.

Revision ID: 0009_unsent_table
Revises: 0008_claim_indexes
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_unsent_table_v9, drop_unsent_table_v9

revision = "0009_unsent_table"
down_revision = "0008_claim_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_unsent_table_v9()


def downgrade() -> None:
    drop_unsent_table_v9()
