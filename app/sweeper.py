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

from app import job_runs, queue
from app.config import Settings
from app.db.models import Checkpoint, Job
from app.db.session import read_session_scope, session_scope
from app.jobs import TERMINAL
from app.storage import ArtifactStore

logger = logging.getLogger(__name__)


def sweep_once(settings: Settings) -> list[str]:
    try:  # cleanup only: it never stands in the way of re-queuing
        remove_scratch_of_ended_jobs(settings)
    except Exception:
        logger.exception("removing the scratch of finished jobs failed")
    started = time.time()
    with session_scope(settings.sqlalchemy_url) as session:
        job_ids = job_runs.sweep(
            session,
            requeue_after_seconds=settings.requeue_after_seconds,
            max_attempts=settings.max_attempts,
        )
    if job_ids:
        remove_unrecorded_checkpoints(settings, job_ids, older_than=started)
        if _enough_messages_waiting(settings):
            return []
    for job_id in job_ids:
        queue.enqueue_training(job_id)
    return job_ids


def _enough_messages_waiting(settings: Settings) -> bool:
    """True when the broker already holds a message for every queued job.

    A queued job waiting behind a long one is not lost; re-sending it every
    `requeue_after_seconds` would pile up copies faster than a busy worker skips them.
    Re-send only when messages may be missing (fewer than queued jobs, e.g. after Redis
    lost them); the worker drains the queue in order, so a job whose copy is short gets one
    as soon as the count drops below the queued jobs.
    """
    pending = queue.pending_messages()
    if pending is None:
        return False
    with read_session_scope(settings.sqlalchemy_url) as session:
        queued = session.scalar(select(func.count()).where(Job.status == "queued"))
    return pending >= queued


def remove_unrecorded_checkpoints(
    settings: Settings, job_ids: list[str], *, older_than: float
) -> list[str]:
    """Delete what a dead attempt left in `checkpoints/<job>/` and `tmp/<job>/`: its
    scratch (checkpoints half-written by the loop, the adapter's out dir), half-copied
    staging dirs, and checkpoints it renamed into place but never recorded (no row:
    never resumed from).

    The jobs are queued (no attempt owns them), and only entries older than the sweep
    are touched, so a new attempt that claimed the job since then keeps its files.
    """
    store = ArtifactStore(settings.artifacts_dir)
    with read_session_scope(settings.sqlalchemy_url) as session:
        recorded = set(
            session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id.in_(job_ids)))
        )
    removed = []
    for job_id in job_ids:
        for folder in (f"checkpoints/{job_id}", f"tmp/{job_id}"):
            for key, mtime in _entries(store, folder):
                if key not in recorded and mtime < older_than:
                    store.delete(key)
                    removed.append(key)
    if removed:
        logger.info("removed leftovers of dead attempts: %s", removed)
    return removed


def _entries(store: ArtifactStore, folder: str) -> list[tuple[str, float]]:
    """(key, mtime) of each entry of `folder` in the store; one that vanished is skipped."""
    entries = []
    try:
        children = list(store.path(folder).iterdir())
    except FileNotFoundError:
        return []
    for entry in children:
        try:
            entries.append((f"{folder}/{entry.name}", entry.stat().st_mtime))
        except FileNotFoundError:  # removed since the listing
            continue
    return entries


def remove_scratch_of_ended_jobs(settings: Settings) -> list[str]:
    """Delete `tmp/<job>/` of terminal jobs: those the sweep itself ended (cancelled or
    out of attempts while their worker was dead), or whose worker failed to clean up.
    Terminal states absorb, so no attempt will ever write there again."""
    store = ArtifactStore(settings.artifacts_dir)
    owners = [p.name for p in (store.root / "tmp").iterdir() if p.name.startswith("ftjob-")]
    if not owners:
        return []
    with read_session_scope(settings.sqlalchemy_url) as session:
        ended = list(
            session.scalars(select(Job.id).where(Job.id.in_(owners), Job.status.in_(TERMINAL)))
        )
    for job_id in ended:
        store.remove_scratch(job_id)
    if ended:
        logger.info("removed the scratch of finished jobs: %s", ended)
    return ended


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
