"""Fine-tuning jobs, the run protocol: claim, lease, progress, completion (the worker's
calls), and `sweep`, the recovery the API process runs periodically (app/jobs/sweep.py).

Every write after the claim is conditional on (job id, attempt, status running,
not cancelled): `attempt` is a fencing token, so a stale or duplicate worker whose
lease was taken over changes nothing (docs/design.md §4.3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.errors import RunAborted
from app.jobs.service import add_event
from app.statuses import JobStatus, RunOutcome
from app.webhooks.outbox import record_job_ended

logger = logging.getLogger(__name__)

# "Now" for leases and the sweep; tests replace it to move time on without sleeping.
clock: Callable[[], datetime] = utcnow


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int


def _claimable(now: Any, max_attempts: int) -> tuple[ColumnElement[bool], ...]:
    """Queued, or running on a lapsed lease (its worker died); never a cancelled or paused
    one. Attempts that ended in a pause are not failures: they do not count."""
    return (
        or_(
            Job.status == JobStatus.QUEUED,
            and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
        ),
        Job.cancel_requested.is_(False),
        Job.attempt - Job.pauses < max_attempts,
    )


def claim_job(
    session: Session, *, job_id: str, worker: str, lease_seconds: int, max_attempts: int
) -> Claim | None:
    """Take the job with one conditional UPDATE; None when someone else has it or it is done."""
    now = clock()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *_claimable(now, max_attempts))
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            worker=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=func.coalesce(Job.started_at, now),
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]  # DML returns a CursorResult
        return None
    attempt = session.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
    add_event(session, job_id=job_id, message=f"Fine-tuning job started (attempt {attempt})")
    return Claim(job_id, attempt)


CLAIM_LOCK = 0x6C6F7261  # pg_advisory_xact_lock key of claims ("lora")


def claim_next(
    session: Session,
    *,
    worker: str,
    lease_seconds: int,
    max_attempts: int,
    max_running_per_org: int = 0,
    routed: ColumnElement[bool] | None = None,
) -> Claim | None:
    """Take the next job by the fair policy; None when nothing is claimable.

    `routed` (`routing.claimable_by` the worker's queues) limits the candidates to the
    jobs of the base models routed to the queues the worker consumes (None: any job).

    A message only wakes a worker: whichever job it names, the worker takes the oldest
    claimable job of the organization with the fewest running jobs (ties: the organization
    that started a job least recently), skipping organizations at `max_running_per_org`
    (0: no cap). `claim_job`'s conditional UPDATE stays the fence.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Claims are serialised (as SQLite's writer lock does), so the running counts the
        # policy and the cap read are exact; it is held for milliseconds, until commit.
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK)))
    candidate = _next_candidate(clock(), max_attempts, max_running_per_org)
    job_id = session.scalar(candidate if routed is None else candidate.where(routed))
    if job_id is None:
        return None
    return claim_job(
        session,
        job_id=job_id,
        worker=worker,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
    )


def _next_candidate(now: Any, max_attempts: int, cap: int) -> Any:
    live = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at >= now)
    waiting = select(Job.organization_id).where(*_claimable(now, max_attempts))
    per_org = (
        select(
            Job.organization_id.label("org"),
            func.sum(case((live, 1), else_=0)).label("running"),
            func.max(Job.started_at).label("last_start"),
        )
        .where(Job.organization_id.in_(waiting))
        .group_by(Job.organization_id)
        .subquery()
    )
    query = (
        select(Job.id)
        .join(per_org, per_org.c.org == Job.organization_id)
        .where(*_claimable(now, max_attempts))
        .order_by(
            per_org.c.running,
            per_org.c.last_start.asc().nulls_first(),
            Job.created_at,
            Job.id,
        )
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)  # PostgreSQL; SQLite has its writer lock
    )
    return query.where(per_org.c.running < cap) if cap > 0 else query


def renew_lease(
    session: Session, *, claim: Claim, lease_seconds: int, progress: dict[str, Any] | None = None
) -> bool:
    """Heartbeat and cancel check in one statement; raises RunAborted when the run must stop.
    Returns whether a pause is requested (the run checkpoints and ends at this step).

    `progress`: job columns the same fenced statement writes (trained_tokens,
    estimated_finish, steps_completed, steps_planned), so progress is never a stale
    attempt's."""
    pause_requested = session.execute(
        update(Job)
        .where(*owned(claim), Job.cancel_requested.is_(False))
        .values(lease_expires_at=clock() + timedelta(seconds=lease_seconds), **(progress or {}))
        .returning(Job.pause_requested)
    ).scalar_one_or_none()
    if pause_requested is None:
        still_ours = session.scalar(select(Job.id).where(*owned(claim)))
        raise RunAborted(RunOutcome.CANCELLED if still_ours else RunOutcome.LEASE_LOST)
    return pause_requested


def hold_lease(session: Session, *, claim: Claim, lease_seconds: int) -> RunOutcome | None:
    """The supervising process's heartbeat: why the run must stop, or None.

    Unlike `renew_lease` it keeps extending a cancelled run's lease: the job stays
    `running` (and counts as active) until its process has really stopped, so the sweep
    never marks it `cancelled` while it still computes.
    """
    held = session.execute(
        update(Job)
        .where(*owned(claim))
        .values(lease_expires_at=clock() + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested)
    ).scalar_one_or_none()
    if held is None:
        return RunOutcome.LEASE_LOST
    return RunOutcome.CANCELLED if held else None


def check_run(session: Session, *, claim: Claim) -> None:
    """The check between micro-batches (a read, no lock): raises RunAborted when the run was
    cancelled, taken over, or its lease lapsed (another attempt may take it at any time)."""
    cancel_requested = session.scalar(
        select(Job.cancel_requested).where(*owned(claim), Job.lease_expires_at >= clock())
    )
    if cancel_requested is None or cancel_requested:
        raise RunAborted(RunOutcome.CANCELLED if cancel_requested else RunOutcome.LEASE_LOST)


@contextmanager
def keep_lease(url: str, *, claim: Claim, lease_seconds: int) -> Iterator[None]:
    """Renew the lease from a thread every lease/3 seconds while the body runs.

    Steps renew it too, but loading a base model, saving a checkpoint or publishing take
    no step and can outlast a lease; without this the sweep would re-queue a healthy run.
    The thread dies with the process, so a killed worker still loses its lease in time.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease_seconds / 3):
            try:
                with session_scope(url) as session:
                    renew_lease(session, claim=claim, lease_seconds=lease_seconds)
            except RunAborted:
                return  # cancelled or taken over: the run's next renewal raises and stops it
            except Exception:  # a database blip: the next beat retries, the lease has slack
                logger.warning("lease renewal of %s failed", claim.job_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"lease-{claim.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def owned(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status == JobStatus.RUNNING)


def end_run(
    session: Session, *, claim: Claim, status: JobStatus, error: dict[str, Any] | None = None
) -> bool:
    """Move an owned run to `failed` or `cancelled`; False when it is no longer ours."""
    ended = session.execute(  # type: ignore[attr-defined]  # DML returns a CursorResult
        update(Job)
        .where(*owned(claim))
        .values(status=status, error=error, finished_at=utcnow(), lease_expires_at=None)
    ).rowcount
    if ended:
        record_job_ended(session, job_id=claim.job_id, status=status)
        if status == JobStatus.CANCELLED:
            add_event(session, job_id=claim.job_id, message="Fine-tuning job cancelled")
        else:
            add_event(
                session,
                job_id=claim.job_id,
                level="error",
                message=f"Fine-tuning job failed: {error and error.get('message')}",
            )
    return bool(ended)


def pause_run(session: Session, *, claim: Claim) -> RunOutcome:
    """End an owned attempt that checkpointed for a pause: `paused`, or `queued` again when
    the pause was withdrawn (resumed) while it checkpointed; `cancelled` when a cancel came
    meanwhile. LEASE_LOST (nothing written) when the job is no longer ours."""
    flags = session.execute(
        select(Job.pause_requested, Job.cancel_requested).where(*owned(claim)).with_for_update()
    ).one_or_none()
    if flags is None:
        return RunOutcome.LEASE_LOST
    requested, cancel_requested = flags
    if cancel_requested:
        end_run(session, claim=claim, status=JobStatus.CANCELLED)
        return RunOutcome.CANCELLED
    session.execute(
        update(Job)
        .where(Job.id == claim.job_id)
        .values(
            status=JobStatus.PAUSED if requested else JobStatus.QUEUED,
            pause_requested=False,
            pauses=Job.pauses + 1,
            lease_expires_at=None,
            estimated_finish=None,
            enqueued_at=None if requested else clock(),
        )
    )
    step = session.scalar(select(Job.steps_completed).where(Job.id == claim.job_id))
    message = (
        f"Fine-tuning job paused at step {step}; resume continues from its checkpoint"
        if requested
        else "The pause was withdrawn while checkpointing; the job was re-queued"
    )
    add_event(session, job_id=claim.job_id, message=message, data={"step": step})
    return RunOutcome.PAUSED


def sweep(session: Session, *, requeue_after_seconds: int, max_attempts: int) -> list[str]:
    """Recover from lost messages and dead workers; returns the job ids to enqueue again."""
    now = clock()
    expired = list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
            .with_for_update()
        )
    )
    to_enqueue: list[str] = []
    for job in expired:
        if job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELLED, now
            add_event(session, job_id=job.id, message="Fine-tuning job cancelled")
            record_job_ended(session, job_id=job.id, status=JobStatus.CANCELLED)
        elif job.attempt - job.pauses >= max_attempts:
            job.status, job.finished_at = JobStatus.FAILED, now
            job.error = {
                "code": "worker_lost",
                "param": None,
                "message": f"the worker running this job stopped {max_attempts} times; giving up",
            }
            add_event(session, job_id=job.id, level="error", message=job.error["message"])
            record_job_ended(session, job_id=job.id, status=JobStatus.FAILED)
        else:
            job.status, job.enqueued_at = JobStatus.QUEUED, now
            add_event(
                session,
                job_id=job.id,
                level="warn",
                message="The worker stopped responding; the job was re-queued",
            )
            to_enqueue.append(job.id)
    stale = now - timedelta(seconds=requeue_after_seconds)
    for job in session.scalars(
        select(Job).where(
            Job.status == JobStatus.QUEUED,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
        )
    ):
        job.enqueued_at = now
        to_enqueue.append(job.id)
    session.flush()
    return to_enqueue
