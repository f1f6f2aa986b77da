"""Give the outbox a durable identity for its Kafka names and progress records.

Revision ID: 0006_outbox_identity
Revises: 0005_lane_index
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_outbox_identity_v6, drop_outbox_identity_v6

revision = "0006_outbox_identity"
down_revision = "0005_lane_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_identity_v6()


def downgrade() -> None:
    drop_outbox_identity_v6()
