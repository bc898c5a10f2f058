"""The periodic sweep, run as a thread in the API process.

It re-sends queued jobs whose wake-up message may have been lost (broker restart,
enqueue failure) and re-queues running jobs whose worker stopped renewing its lease.
Every step is idempotent, so several API replicas sweeping at once is harmless.
"""

from __future__ import annotations

import logging
import threading

from app import job_runs, queue
from app.config import Settings
from app.db.session import session_scope

logger = logging.getLogger(__name__)


def sweep_once(settings: Settings) -> list[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        job_ids = job_runs.sweep(
            session,
            requeue_after_seconds=settings.requeue_after_seconds,
            max_attempts=settings.max_attempts,
        )
    for job_id in job_ids:
        queue.enqueue_training(job_id)
    return job_ids


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
