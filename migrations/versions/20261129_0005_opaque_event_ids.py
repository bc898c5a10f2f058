"""opaque event ids

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 05:00:00

- job_event.public_id: the id clients see and page by (`ftevent-` + 24 random characters).
  The global `seq` counted every organization's events, so a tenant could read the
  service's activity off its own event ids. Existing events get a random id here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# 24 random hex characters after the prefix for the rows stored so far (new rows get
# app.ids.new_id's alphanumerics); to a reader both are equally opaque.
_RANDOM = {
    "postgresql": "substr(md5(random()::text || clock_timestamp()::text || seq::text), 1, 24)",
    "sqlite": "lower(hex(randomblob(12)))",
}


def upgrade() -> None:
    with op.batch_alter_table("job_event") as batch:
        batch.add_column(sa.Column("public_id", sa.String(length=40), nullable=True))
    random_part = _RANDOM[op.get_bind().dialect.name]
    op.execute(f"UPDATE job_event SET public_id = 'ftevent-' || {random_part}")
    with op.batch_alter_table("job_event") as batch:
        batch.alter_column("public_id", existing_type=sa.String(length=40), nullable=False)
        batch.create_unique_constraint(op.f("uq_job_event_public_id"), ["public_id"])


def downgrade() -> None:
    with op.batch_alter_table("job_event") as batch:
        batch.drop_constraint(op.f("uq_job_event_public_id"), type_="unique")
        batch.drop_column("public_id")
