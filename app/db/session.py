"""Engines and sessions. The only place that commits (`session_scope`, `commit`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, UOWTransaction, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from app.config import get_settings

if TYPE_CHECKING:
    import sqlite3

# How long a request waits for a pooled connection before it is answered 503 + Retry-After
# (app/api/errors.py). Short: under exhaustion, failing fast frees the caller's thread and
# tells the client to back off, where SQLAlchemy's default 30 s only queues more work.
POOL_TIMEOUT_SECONDS = 5


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _new_engine(url, pool_timeout=POOL_TIMEOUT_SECONDS)
    return _new_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=POOL_TIMEOUT_SECONDS
    )


def _new_engine(url: str, **pool: Any) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, **pool)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits instead of failing.
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A writer's BEGIN IMMEDIATE takes the write lock up front, so two processes racing on a
    # conditional UPDATE serialise instead of failing with "database is locked". A read
    # session begins deferred: under WAL it reads a snapshot and never queues behind the
    # write lock (or behind other readers, which IMMEDIATE would serialise).
    read_only = connection.get_execution_options().get(_READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_READ_ONLY = "loraforge_read_only"


@lru_cache(maxsize=8)
def _factory(url: str, read_only: bool = False) -> sessionmaker[Session]:
    engine = get_engine(url)
    if not read_only:
        return sessionmaker(bind=engine, expire_on_commit=False)
    factory = sessionmaker(bind=engine.execution_options(**{_READ_ONLY: True}))
    event.listen(factory, "before_flush", _refuse_writes)
    return factory


def _refuse_writes(session: Session, _context: UOWTransaction, _instances: object) -> None:
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("a read-only session was asked to write; use session_scope")


def new_session(url: str | None = None) -> Session:
    return _factory(url or get_settings().sqlalchemy_url)()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with _unit_of_work(new_session(url)) as session:
        yield session


@contextmanager
def _unit_of_work(session: Session) -> Iterator[Session]:
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def unpooled_session_scope(url: str) -> Iterator[Session]:
    """`session_scope` on a connection of its own, closed at the end: for a thread of a
    process that forks (a worker's heartbeat), so that a child never inherits a pool lock
    or connection that thread held at the fork."""
    engine = _new_engine(url, poolclass=NullPool)
    try:
        with _unit_of_work(Session(bind=engine, expire_on_commit=False)) as session:
            yield session
    finally:
        engine.dispose()


@contextmanager
def read_session_scope(url: str | None = None) -> Iterator[Session]:
    """Reads only (a write raises): never takes SQLite's write lock; rolled back at the end."""
    session = _factory(url or get_settings().sqlalchemy_url, read_only=True)()
    try:
        yield session
    finally:
        session.close()


def commit(session: Session) -> None:
    """Commit a request's session early (before enqueueing work that reads the rows)."""
    session.commit()
