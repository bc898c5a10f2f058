"""Running Alembic from code (`loraforge db upgrade`, tests), and checking a database is current."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import make_url

from app.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: str) -> Config:
    for root in (Path.cwd(), REPO_ROOT):
        if (root / "alembic.ini").is_file() and (root / "migrations").is_dir():
            config = Config(str(root / "alembic.ini"))
            config.attributes["url"] = url
            return config
    raise FileNotFoundError(
        "alembic.ini and migrations/ not found (run from the loraforge checkout)"
    )


def upgrade(settings: Settings, revision: str = "head") -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.sqlalchemy_url), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings.sqlalchemy_url), revision)


def shown_url(url: str) -> str:
    """A database URL fit to print: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def schema_problem(settings: Settings) -> str | None:
    """Why this database cannot be used as it is (naming it), or None when it is at head.

    Never creates anything: SQLite would make an empty file just by being opened, so a
    missing file is reported before connecting. A database that cannot be reached raises
    sqlalchemy's OperationalError (the caller decides whether that is fatal).
    """
    from app.db.session import get_engine

    if settings.database_file is not None and not settings.database_file.is_file():
        return f"there is no loraforge database at {settings.database_file}"
    url = settings.sqlalchemy_url
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return f"the database {shown_url(url)} has no loraforge tables yet"
    if current != head:
        return (
            f"the database {shown_url(url)} is at schema revision {current}, this code needs {head}"
        )
    return None
