"""Commits notify only while a lane sleeps: the idle lanes table and a wake-up trigger that reads it.

Revision ID: 0011_idle_lanes
Revises: 0010_autovacuum
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_idle_lanes_v11, drop_idle_lanes_v11

revision = "0011_idle_lanes"
down_revision = "0010_autovacuum"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_idle_lanes_v11()


def downgrade() -> None:
    drop_idle_lanes_v11()
