"""The periodic sweep, run as a thread in the API process.

It re-sends queued jobs whose wake-up message may have been lost (broker restart,
enqueue failure) and re-queues running jobs whose worker stopped renewing its lease.
Every step is idempotent, so several API replicas sweeping at once is harmless.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import func, select

from app.config import Settings
from app.db.models import Job
from app.db.session import read_session_scope, session_scope
from app.jobs import queue, routing, workers
from app.jobs import runs as job_runs
from app.jobs.leftovers import (
    UNRECORDED_DATASET_GRACE_SECONDS,
    remove_dead_attempts_leftovers,
    remove_scratch_of_ended_jobs,
    remove_unrecorded_datasets,
)
from app.statuses import JobStatus
from app.webhooks import delivery as webhook_delivery
from app.webhooks import queue as webhook_queue

logger = logging.getLogger(__name__)


_datasets_due = 0.0  # when this process next lists the stored datasets (a listing is costly)


def sweep_once(settings: Settings) -> list[str]:
    global _datasets_due
    try:  # cleanup only: it never stands in the way of re-queuing
        remove_scratch_of_ended_jobs(settings)
        if time.time() >= _datasets_due:
            _datasets_due = time.time() + UNRECORDED_DATASET_GRACE_SECONDS / 4
            remove_unrecorded_datasets(settings, now=time.time())
    except Exception:
        logger.exception("removing the leftovers of finished jobs or uploads failed")
    try:  # webhooks never stand in the way of jobs either
        resend_due_webhooks(settings)
    except Exception:
        logger.exception("re-sending due webhook deliveries failed")
    started = time.time()
    with session_scope(settings.sqlalchemy_url) as session:
        job_ids = job_runs.sweep(
            session,
            requeue_after_seconds=settings.requeue_after_seconds,
            max_attempts=settings.max_attempts,
        )
        of_jobs = select(Job.id, Job.model).where(Job.id.in_(job_ids))
        models = dict(session.execute(of_jobs).tuples().all())
        workers.note_waiting_jobs(session, settings, now=job_runs.clock())
    if job_ids:
        remove_dead_attempts_leftovers(settings, job_ids, older_than=started)
        if _enough_messages_waiting(settings):
            return []
    for job_id in job_ids:
        queue.wake_job(job_id, models[job_id], settings)
    return job_ids


def resend_due_webhooks(settings: Settings) -> list[str]:
    """Wake the deliveries that are due with no message on its way (a retry's time has
    come, or a message was lost): the outbox row is the truth, the message a nudge."""
    with session_scope(settings.sqlalchemy_url) as session:
        due = webhook_delivery.due_deliveries(
            session, requeue_after_seconds=settings.requeue_after_seconds
        )
    for delivery_id in due:
        webhook_queue.enqueue_delivery(delivery_id)
    return due


def _enough_messages_waiting(settings: Settings) -> bool:
    """True when the broker already holds a message for every queued job.

    A queued job waiting behind a long one is not lost; re-sending it every
    `requeue_after_seconds` would pile up copies faster than a busy worker skips them.
    Re-send only when messages may be missing (fewer than queued jobs, e.g. after Redis
    lost them). A message is a wake-up for whichever job the fair policy picks, not for
    the job it names, so one waiting message per queued job is enough.
    """
    pending = queue.pending_messages({*settings.model_queues.values(), routing.DEFAULT_QUEUE})
    if pending is None:
        return False
    with read_session_scope(settings.sqlalchemy_url) as session:
        queued = session.execute(
            select(func.count()).where(Job.status == JobStatus.QUEUED)
        ).scalar_one()
    return pending >= queued


def start_sweeper(settings: Settings) -> threading.Event:
    """Run `sweep_once` every `sweep_interval_seconds`; set the returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.sweep_interval_seconds):
            try:
                if job_ids := sweep_once(settings):
                    logger.info("sweep re-enqueued %s", job_ids)
            except Exception:  # the next round retries; a sweep must never kill the API
                logger.exception("sweep failed")

    threading.Thread(target=loop, name="loraforge-sweeper", daemon=True).start()
    return stop
