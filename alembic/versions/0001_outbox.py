"""Create the outbox events table and the relay's state tables.

Revision ID: 0001_outbox
Revises:
Create Date: 2026-11-27
"""

import os

from alembic import context
from outbox_relay.models.migration import create_outbox_v1, drop_outbox_v1

revision = "0001_outbox"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The initial lane count: `outbox-relay migrate --lanes N` or OUTBOX_LANES.
    lanes = context.config.attributes.get("lanes") or os.environ.get("OUTBOX_LANES") or 4
    create_outbox_v1(lanes=int(lanes))


def downgrade() -> None:
    drop_outbox_v1()
