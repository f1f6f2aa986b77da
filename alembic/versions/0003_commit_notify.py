"""Notify relays when events commit (LISTEN/NOTIFY wake-ups; polling stays the safety net).

Revision ID: 0003_commit_notify
Revises: 0002_scale_out
Create Date: 2026-11-27
"""

from outbox_relay.models.migration import add_commit_notify_v3, drop_commit_notify_v3

revision = "0003_commit_notify"
down_revision = "0002_scale_out"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_commit_notify_v3()


def downgrade() -> None:
    drop_commit_notify_v3()
