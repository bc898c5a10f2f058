"""An in-process API (TestClient) over a migrated SQLite database, with a recording queue,
a client per organization (acme, globex) and acme's training file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app import tenancy
from app.db.base import utcnow
from app.db.session import session_scope
from app.jobs import queue, workers
from tests.factories import api_app, uploaded_file


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(
        queue, "enqueue_training", lambda job_id, queue=None: sent.append(job_id) or True
    )
    return sent


@pytest.fixture
def app(settings, enqueued):  # noqa: ARG001 (no broker in API tests)
    # As under `loraforge up`, a worker consumes the training queue: jobs do not say they
    # wait for one (tests/api/test_roles.py checks that they do when none is live).
    with session_scope(settings.sqlalchemy_url) as session:
        workers.record_heartbeat(session, name="test-worker", queues=["training"], now=utcnow())
    return api_app(settings)


def api_key(settings, org: str) -> str:
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name=org)
        return tenancy.create_api_key(session, organization=organization)


@pytest.fixture
def client(app, settings) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        yield test_client


@pytest.fixture
def other_client(app, settings) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {api_key(settings, 'globex')}"
        yield test_client


@pytest.fixture
def training_file(client) -> str:
    """A dataset of 30 chat examples uploaded by `client` (organization acme)."""
    return uploaded_file(client, 30)
