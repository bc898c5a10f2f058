"""Alembic environment: runs on SQLite (batch mode) and PostgreSQL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine, event

from app.config import get_settings
from app.db import models  # noqa: F401  (registers the tables)
from app.db.base import Base
from app.db.session import get_engine

config = context.config
url = config.attributes.get("url") or get_settings().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _migration_engine() -> Engine:
    """PostgreSQL: the app's engine. SQLite: one with foreign keys OFF while migrating.

    Batch mode rebuilds a table (copy, drop, rename); with foreign keys ON, dropping a
    table that other rows reference fails. SQLite ignores the pragma inside a
    transaction, so it is set on connect, before Alembic begins one.
    """
    if not url.startswith("sqlite"):
        return get_engine(url)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=OFF")
        cursor.close()

    return engine


def run_migrations_online() -> None:
    with _migration_engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
