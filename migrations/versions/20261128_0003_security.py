"""security: idempotency keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:00:00

- idempotency_key: one row per (organization, endpoint, Idempotency-Key) of
  `POST /v1/files` and `POST /v1/fine_tuning/jobs`; a replay returns the same object.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import app.db.base

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_key",
        sa.Column("organization_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("object_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", app.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organization.id"],
            name=op.f("fk_idempotency_key_organization_id_organization"),
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "endpoint", "key", name=op.f("pk_idempotency_key")
        ),
    )


def downgrade() -> None:
    op.drop_table("idempotency_key")
