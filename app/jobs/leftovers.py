"""What dead attempts leave in the store, and its removal.

A `kill -9` during training leaves the attempt's scratch under `tmp/<job>/` on its host
(checkpoints half-written by the loop, the adapter's out dir) and, in the store, under
`checkpoints/<job>/` and `adapters/<job>/`, half-copied staging dirs or half-uploaded objects
(no manifest) and checkpoints published but never recorded. None of it is ever read
(only recorded, sha256-checked checkpoints are resumed from); this removes it: the sweep when
it re-queues a dead attempt's job or sees a job ended, a new attempt when it takes a job over.
"""

from __future__ import annotations

import logging
import shutil

from sqlalchemy import select

from app.config import Settings
from app.db.models import Adapter, Checkpoint, File, Job
from app.db.session import read_session_scope
from app.statuses import TERMINAL_JOB_STATUSES, CheckpointStatus
from app.storage import open_store

logger = logging.getLogger(__name__)


def remove_dead_attempts_leftovers(
    settings: Settings, job_ids: list[str], *, older_than: float
) -> list[str]:
    """Delete what a dead attempt left in `checkpoints/<job>/` and `tmp/<job>/`: its
    scratch (checkpoints half-written by the loop, the adapter's out dir), half-copied
    staging dirs, and checkpoints it renamed into place but never recorded (no row:
    never resumed from).

    The jobs are queued (the sweep re-queued them: no attempt owns them) or were just
    claimed by the caller's new attempt; only entries older than `older_than` (the sweep's
    start, or the claim) are touched, so an attempt that claimed since keeps its files.
    """
    store = open_store(settings)
    with read_session_scope(settings.sqlalchemy_url) as session:
        recorded = set(  # a pruned row's files were due to go after its commit: not kept
            session.scalars(
                select(Checkpoint.storage_key).where(
                    Checkpoint.job_id.in_(job_ids), Checkpoint.status == CheckpointStatus.ACTIVE
                )
            )
        )
        registered = set(session.scalars(select(Adapter.job_id).where(Adapter.job_id.in_(job_ids))))
    removed = []
    for job_id in job_ids:
        stored = store.entries(f"checkpoints/{job_id}")
        inside = store.entries(f"adapters/{job_id}")
        if inside and job_id not in registered:  # published (or half) but never registered
            stored.append((f"adapters/{job_id}", max(mtime for _, mtime in inside)))
        for key, mtime in stored:
            if key not in recorded and mtime < older_than:
                store.delete(key)
                removed.append(key)
        for path, mtime in store.scratch_entries(job_id):  # this host's scratch
            if mtime < older_than:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(f"tmp/{job_id}/{path.name}")
    if removed:
        logger.info("removed leftovers of dead attempts: %s", removed)
    return removed


# An upload's bytes reach the store before its row commits (app/files/service.stage_upload);
# a dataset object with no row after this long is one whose API process died in between.
UNRECORDED_DATASET_GRACE_SECONDS = 3600.0


def remove_unrecorded_datasets(settings: Settings, *, now: float) -> list[str]:
    """Delete dataset objects that no file row records and that are older than the grace
    period: what an upload left when its process died between storing and committing."""
    store = open_store(settings)
    stored = [
        key
        for key, mtime in store.entries("datasets")
        if mtime < now - UNRECORDED_DATASET_GRACE_SECONDS
    ]
    if not stored:
        return []
    with read_session_scope(settings.sqlalchemy_url) as session:
        recorded = set(
            session.scalars(select(File.storage_key).where(File.storage_key.in_(stored)))
        )
    removed = [key for key in stored if key not in recorded]
    for key in removed:
        store.delete(key)
    if removed:
        logger.info("removed datasets stored without a row: %s", removed)
    return removed


def remove_scratch_of_ended_jobs(settings: Settings, job_ids: list[str] | None = None) -> list[str]:
    """Delete `tmp/<job>/` of those of `job_ids` (default: every job with scratch) that are
    terminal: a job its worker just finished, one the sweep itself ended (cancelled or out of
    attempts while its worker was dead), or one whose worker failed to clean up. Terminal
    states absorb, so no attempt will ever write there again; a job that is not terminal
    (e.g. re-queued to a newer attempt) keeps its scratch."""
    store = open_store(settings)
    if job_ids is None:
        job_ids = store.scratch_owners()
    if not job_ids:
        return []
    with read_session_scope(settings.sqlalchemy_url) as session:
        ended = list(
            session.scalars(
                select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(TERMINAL_JOB_STATUSES))
            )
        )
    for job_id in ended:
        store.remove_scratch(job_id)
    if ended:
        logger.info("removed the scratch of finished jobs: %s", ended)
    return ended
