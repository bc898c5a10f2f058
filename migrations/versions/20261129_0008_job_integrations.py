"""experiment trackers of a job

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 10:30:00

- fine_tuning_job.integrations: the job's `integrations` as requested (W&B, MLflow): the
  worker logs the run's config and metrics there (worker/tracking.py). NULL: none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("integrations", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("integrations")
