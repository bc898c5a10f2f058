"""checkpoint status: a pruned checkpoint keeps a row that says so

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 05:00:00

- checkpoint.status: `active` (callable, downloadable, resumable) or `pruned` (removed by
  LORAFORGE_CHECKPOINT_RETENTION: its files are gone, and asking for it answers 404
  `checkpoint_pruned` instead of "does not exist").
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoint") as batch:
        batch.add_column(
            sa.Column("status", sa.String(length=16), server_default="active", nullable=False)
        )


def downgrade() -> None:
    op.execute("DELETE FROM checkpoint WHERE status = 'pruned'")
    with op.batch_alter_table("checkpoint") as batch:
        batch.drop_column("status")
