"""Read-only sessions: on SQLite they never wait for the write lock, and they never write."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from app import tenancy
from app.db.models import Organization
from app.db.session import read_session_scope, session_scope


def test_a_read_goes_through_while_a_writer_holds_the_lock_and_a_read_session_cannot_write(
    settings,
):
    url = settings.sqlalchemy_url
    with session_scope(url) as writer:  # BEGIN IMMEDIATE: holds SQLite's write lock until exit
        tenancy.get_or_create_organization(writer, name="acme")
        writer.flush()
        counted: list[int] = []

        def read() -> None:
            with read_session_scope(url) as reader:
                counted.append(reader.scalar(select(func.count()).select_from(Organization)))

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(timeout=10)  # a reader that queued for the lock would wait 30 s
        assert not thread.is_alive() and counted == [0]  # the snapshot before the commit
    with read_session_scope(url) as reader:
        assert reader.scalar(select(func.count()).select_from(Organization)) == 1
        with pytest.raises(RuntimeError, match="read-only session"):
            tenancy.get_or_create_organization(reader, name="other")  # adds and flushes
