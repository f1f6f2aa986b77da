"""Index discarded events for retention.

Revision ID: 0004_discarded_index
Revises: 0003_commit_notify
Create Date: 2026-11-27
"""

from outbox_relay.models.migration import add_discarded_index_v4, drop_discarded_index_v4

revision = "0004_discarded_index"
down_revision = "0003_commit_notify"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_discarded_index_v4()


def downgrade() -> None:
    drop_discarded_index_v4()
