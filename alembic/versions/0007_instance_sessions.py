"""Record each relay instance's control session, so a dead one stops counting at once.

Revision ID: 0007_instance_sessions
Revises: 0006_outbox_identity
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_instance_sessions_v7, drop_instance_sessions_v7

revision = "0007_instance_sessions"
down_revision = "0006_outbox_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_instance_sessions_v7()


def downgrade() -> None:
    drop_instance_sessions_v7()
