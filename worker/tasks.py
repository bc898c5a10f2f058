"""Celery tasks: thin shells that hand a wake-up message to the worker's supervisor."""

from __future__ import annotations

from app.config import get_settings
from app.jobs.queue import TRAIN_TASK
from app.webhooks import delivery
from app.webhooks.queue import DELIVER_TASK
from worker.celery_app import celery_app
from worker.supervisor import wake


@celery_app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> list[str]:
    """Claim and run jobs by the fair policy (not necessarily `job_id`); a message that
    finds nothing claimable returns at once, without starting any process."""
    return wake(job_id)


@celery_app.task(name=DELIVER_TASK, acks_late=True)
def deliver_webhook(delivery_id: str) -> str | None:
    """One attempt of a webhook delivery if it is due (a duplicate message finds it not due
    and returns at once); retries are scheduled in its row and re-sent by the sweep."""
    status = delivery.deliver(get_settings(), delivery_id)
    return status and status.value
