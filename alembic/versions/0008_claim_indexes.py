"""Claims stop walking delayed events that are not due: a ready lane index and a delayed index.

Revision ID: 0008_claim_indexes
Revises: 0007_instance_sessions
Create Date: 2026-11-30
"""

from outbox_relay.models.migration import add_claim_indexes_v8, drop_claim_indexes_v8

revision = "0008_claim_indexes"
down_revision = "0007_instance_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_claim_indexes_v8()


def downgrade() -> None:
    drop_claim_indexes_v8()
