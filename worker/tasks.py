"""Celery tasks: thin shells that hand a wake-up message to the worker's supervisor."""

from __future__ import annotations

from app.jobs.queue import TRAIN_TASK
from worker.celery_app import celery_app
from worker.supervisor import wake


@celery_app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> list[str]:
    """Claim and run jobs by the fair policy (not necessarily `job_id`); a message that
    finds nothing claimable returns at once, without starting any process."""
    return wake(job_id)
