"""Celery tasks: thin shells that take a job id and hand it to `run_job`."""

from __future__ import annotations

from app.queue import TRAIN_TASK
from worker.celery_app import celery_app
from worker.run_job import run_job


@celery_app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> str:
    """Run one fine-tuning job; a duplicate or stale delivery returns at once."""
    return run_job(job_id)
