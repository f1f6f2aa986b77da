"""Give each lane's claim an index of its own pending rows.

Revision ID: 0005_lane_index
Revises: 0004_discarded_index
Create Date: 2026-11-27
"""

from outbox_relay.models.migration import add_lane_index_v5, drop_lane_index_v5

revision = "0005_lane_index"
down_revision = "0004_discarded_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_lane_index_v5()


def downgrade() -> None:
    drop_lane_index_v5()
