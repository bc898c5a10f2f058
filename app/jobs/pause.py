"""Pause and resume a fine-tuning job (docs/design.md 4.16), the API side.

Pause is a flag like cancel's (4.6): a queued job is held (`paused`) at once; a running one
is flagged, and its worker, which reads the flag with every step's lease renewal, writes a
checkpoint at the end of that step and ends its attempt `paused` (`job_runs.pause_run`).
Resume puts a paused job back in the queue; the next attempt continues from the newest
checkpoint exactly as after a dead worker (4.7). Both are idempotent; a finished job
answers 409.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, Organization
from app.errors import InvalidState
from app.jobs.service import add_event, get_job
from app.statuses import TERMINAL_JOB_STATUSES, JobStatus


def pause_job(session: Session, *, organization: Organization, job_id: str) -> Job:
    """Hold a queued job; ask a running one to checkpoint and stop at its next step."""
    job = _changeable(session, organization, job_id, "paused")
    if job.status == JobStatus.PAUSED or job.pause_requested:
        return job
    if job.cancel_requested:
        raise InvalidState(f"job {job_id} is being cancelled; it cannot be paused")
    held = _move(session, job, JobStatus.QUEUED, status=JobStatus.PAUSED)
    if held:
        add_event(session, job_id=job.id, message="Fine-tuning job paused before it started")
    elif _move(session, job, JobStatus.RUNNING, pause_requested=True):
        add_event(
            session,
            job_id=job.id,
            message="Pause requested; checkpointing at the end of the current step",
        )
    session.refresh(job)
    return job


def resume_job(session: Session, *, organization: Organization, job_id: str) -> Job:
    """Queue a paused job again (the caller enqueues it); withdraw a pause not yet taken.

    Returns the job; `job.status == queued` right after a paused job was resumed is the
    caller's cue to send the wake-up message."""
    job = _changeable(session, organization, job_id, "resumed")
    if _move(session, job, JobStatus.PAUSED, status=JobStatus.QUEUED, enqueued_at=utcnow()):
        add_event(session, job_id=job.id, message="Fine-tuning job resumed")
    elif job.pause_requested and _move(session, job, JobStatus.RUNNING, pause_requested=False):
        add_event(session, job_id=job.id, message="Pause withdrawn; the job keeps running")
    session.refresh(job)
    return job


def _changeable(session: Session, organization: Organization, job_id: str, verb: str) -> Job:
    job = get_job(session, organization=organization, job_id=job_id)
    if job.status in TERMINAL_JOB_STATUSES:
        raise InvalidState(f"job {job_id} has already {job.status}; it cannot be {verb}")
    return job


def _move(session: Session, job: Job, source: JobStatus, **values: object) -> bool:
    """One conditional UPDATE from `source` (not cancel-requested); whether it applied."""
    moved = session.execute(  # type: ignore[attr-defined]  # DML returns a CursorResult
        update(Job)
        .where(Job.id == job.id, Job.status == source, Job.cancel_requested.is_(False))
        .values(**values)
    ).rowcount
    return bool(moved)
