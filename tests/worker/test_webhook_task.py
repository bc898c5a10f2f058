"""Issue 11 §5 through the worker: a job that fails in `run_job` writes its event in the
same transaction, the after-commit message runs the Celery task's body, and a receiver on
loopback gets a signed event it verifies."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from app.config import get_settings
from app.db.models import Organization, WebhookDelivery
from app.db.session import session_scope
from app.statuses import RunOutcome
from app.webhooks import queue
from app.webhooks import service as webhooks
from tests.factories import submit
from tests.webhook_receiver import Receiver, free_port, receiving
from worker import run_job as run_job_module


def broken_training(*_: object) -> None:
    raise RuntimeError("the GPU caught fire")


@pytest.fixture
def task(settings, monkeypatch):
    """The worker's deliver task, reading this test's settings, run when it is enqueued."""
    monkeypatch.setenv("LORAFORGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("LORAFORGE_WEBHOOK_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    from worker.tasks import deliver_webhook

    results: list[str | None] = []
    monkeypatch.setattr(queue, "enqueue_delivery", lambda i: results.append(deliver_webhook(i)))
    yield results
    get_settings.cache_clear()


def test_a_job_failing_in_the_worker_is_announced_signed(settings, task, monkeypatch) -> None:
    monkeypatch.setattr(run_job_module, "_train_and_publish", broken_training)
    job_id = submit(settings, org="acme")
    with receiving(Receiver(free_port())) as receiver:
        with session_scope(settings.sqlalchemy_url) as session:
            org = session.scalars(select(Organization).where(Organization.name == "acme")).one()
            secret = webhooks.create_endpoint(
                session, organization=org, url=receiver.url,
                event_types=["fine_tuning.job.failed"],
            ).secret  # fmt: skip
        assert run_job_module.run_job(job_id, settings=settings) == RunOutcome.FAILED
    assert task == ["delivered"]
    [got] = receiver.requests
    event = Webhook(secret).verify(got.body, got.headers)
    assert event["type"] == "fine_tuning.job.failed" and event["data"] == {"id": job_id}
    with session_scope(settings.sqlalchemy_url) as session:
        [row] = session.scalars(select(WebhookDelivery)).all()
        assert row.id == got.headers["webhook-id"] and row.status == "delivered"
