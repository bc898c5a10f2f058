"""training engine: continued jobs, verifiable resume state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:45:00

- fine_tuning_job.parent_model: the `ft:` adapter a job continues training (null for a
  job that starts from the bare base model).
- checkpoint.state_sha256: sha256 of the checkpoint's manifest.json, which lists the
  sha256 of every file needed for exact resume (optimizer, scheduler, RNG, data position).
  A resumed attempt verifies the chain DB → manifest → files before loading anything.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job") as batch:
        batch.add_column(sa.Column("parent_model", sa.String(length=255), nullable=True))
    with op.batch_alter_table("checkpoint") as batch:
        batch.add_column(sa.Column("state_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE … DROP COLUMN (SQLite >= 3.35, PostgreSQL): batch mode would
    # recreate fine_tuning_job on SQLite, which rows of other tables reference (FKs on).
    op.execute("ALTER TABLE checkpoint DROP COLUMN state_sha256")
    op.execute("ALTER TABLE fine_tuning_job DROP COLUMN parent_model")
