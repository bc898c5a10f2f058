"""the training method of a job

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 13:00:00

- fine_tuning_job.method: `supervised` or `dpo` (app/jobs/spec.py Method); the rows before
  it are supervised, so the column is filled with that and is NOT NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("method", sa.String(16), nullable=False, server_default="supervised")
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("method")
