"""The consumer inbox: processed event ids, stored offsets, parked events.

Revision ID: i0001_inbox
Revises:
Create Date: 2026-11-30
"""

from outbox_relay.models.inbox_migration import create_inbox_v1, drop_inbox_v1

revision = "i0001_inbox"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_v1()


def downgrade() -> None:
    drop_inbox_v1()
