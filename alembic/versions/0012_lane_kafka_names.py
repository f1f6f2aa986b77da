"""Each lane records the Kafka names its owner publishes under, so the next owner can settle its work.

Revision ID: 0012_lane_kafka_names
Revises: 0011_idle_lanes
Create Date: 2026-12-01
"""

from outbox_relay.models.migration import add_lane_kafka_names_v12, drop_lane_kafka_names_v12

revision = "0012_lane_kafka_names"
down_revision = "0011_idle_lanes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_lane_kafka_names_v12()


def downgrade() -> None:
    drop_lane_kafka_names_v12()
