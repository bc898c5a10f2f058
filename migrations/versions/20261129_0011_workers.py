"""workers and their queues

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 13:00:00

- workers: each worker process's queues and its last heartbeat (app/jobs/workers.py), so the
  API can say that a job waits for a worker on its queue and list the workers seen.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import app.db.base

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UTC = app.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("started_at", UTC, nullable=False),
        sa.Column("last_seen", UTC, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_last_seen"), "workers", ["last_seen"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_last_seen"), table_name="workers")
    op.drop_table("workers")
