"""job progress while it runs

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 04:30:00

- fine_tuning_job.estimated_finish: when the running attempt should end, from its
  observed step rate (shown as OpenAI's `estimated_finish`, a unix timestamp).
- fine_tuning_job.steps_completed / steps_planned: optimizer steps done and planned,
  written with `trained_tokens` at every step (with the lease renewal).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import app.db.base

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("estimated_finish", app.db.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("steps_completed", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("steps_planned", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("steps_planned")
        batch_op.drop_column("steps_completed")
        batch_op.drop_column("estimated_finish")
