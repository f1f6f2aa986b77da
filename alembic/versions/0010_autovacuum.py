"""Autovacuum follows retention: the events and sent tables are vacuumed once 1% of them is dead.

Revision ID: 0010_autovacuum
Revises: 0009_unsent_table
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_autovacuum_settings_v10, drop_autovacuum_settings_v10

revision = "0010_autovacuum"
down_revision = "0009_unsent_table"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_autovacuum_settings_v10()


def downgrade() -> None:
    drop_autovacuum_settings_v10()
