"""What dead attempts leave in the store, and its removal.

A `kill -9` during training leaves the attempt's scratch under `tmp/<job>/` (checkpoints
half-written by the loop, the adapter's out dir) and, under `checkpoints/<job>/`, half-copied
staging dirs or checkpoints renamed into place but never recorded. None of it is ever read
(only recorded, sha256-checked checkpoints are resumed from); this removes it: the sweep when
it re-queues a dead attempt's job or sees a job ended, a new attempt when it takes a job over.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.config import Settings
from app.db.models import Checkpoint, Job
from app.db.session import read_session_scope
from app.statuses import TERMINAL_JOB_STATUSES, CheckpointStatus
from app.storage import ArtifactStore

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
    store = ArtifactStore(settings.artifacts_dir)
    with read_session_scope(settings.sqlalchemy_url) as session:
        recorded = set(  # a pruned row's files were due to go after its commit: not kept
            session.scalars(
                select(Checkpoint.storage_key).where(
                    Checkpoint.job_id.in_(job_ids), Checkpoint.status == CheckpointStatus.ACTIVE
                )
            )
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


def remove_scratch_of_ended_jobs(settings: Settings, job_ids: list[str] | None = None) -> list[str]:
    """Delete `tmp/<job>/` of those of `job_ids` (default: every job with scratch) that are
    terminal: a job its worker just finished, one the sweep itself ended (cancelled or out of
    attempts while its worker was dead), or one whose worker failed to clean up. Terminal
    states absorb, so no attempt will ever write there again; a job that is not terminal
    (e.g. re-queued to a newer attempt) keeps its scratch."""
    store = ArtifactStore(settings.artifacts_dir)
    if job_ids is None:
        job_ids = [p.name for p in (store.root / "tmp").iterdir() if p.name.startswith("ftjob-")]
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
