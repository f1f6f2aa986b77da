"""Relay instance registry and announced lane-count changes, for scale-out.

Revision ID: 0002_scale_out
Revises: 0001_outbox
Create Date: 2026-11-27
"""

from outbox_relay.models.migration import add_scale_out_v2, drop_scale_out_v2

revision = "0002_scale_out"
down_revision = "0001_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_scale_out_v2()


def downgrade() -> None:
    drop_scale_out_v2()
