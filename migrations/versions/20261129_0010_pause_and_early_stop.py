"""pause and resume, early stopping

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 13:00:00

- fine_tuning_job.pause_requested: a pause asked of a running job; its worker checkpoints at
  the next step and ends the attempt `paused` (docs/design.md 4.16).
- fine_tuning_job.pauses: attempts that ended in a pause; they do not count against
  LORAFORGE_MAX_ATTEMPTS (which bounds dead workers), so `attempt - pauses` is compared.
- fine_tuning_job.best_step: the step whose weights are the fine-tuned model when early
  stopping ended the job (4.17); NULL otherwise (the last step's).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("pauses", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("best_step", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("best_step")
        batch_op.drop_column("pauses")
        batch_op.drop_column("pause_requested")
