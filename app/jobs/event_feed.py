"""Following a job's events as they are written: what `GET …/events?stream=true` sends.

Events come oldest first from a cursor (the internal `seq` of the last event the client saw,
`Last-Event-ID`), until the job has ended and every event before its end has been sent; then
the ended job comes last. Each poll opens a short read-only session and closes it before the
wait (docs/design.md 9.5): an open stream holds no database connection between polls, and the
polls run on worker threads, never on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent, Organization
from app.db.session import read_session_scope
from app.jobs.service import event_seq, get_job
from app.statuses import TERMINAL_JOB_STATUSES

POLL_SECONDS = 1.0  # how long a stream waits for new events before it looks again
BATCH = 100  # events read per poll; a backlog is read batch after batch without waiting


@dataclass(frozen=True)
class Poll:
    events: list[JobEvent]  # oldest first, after the cursor
    ended: Job | None  # the job, once it has ended and `events` holds the last of its events


def stream_start(
    session: Session, *, organization: Organization, job_id: str, last_event_id: str | None
) -> int:
    """The cursor a stream starts from: 0, or the seq of `last_event_id` (one of this job's
    events; another organization's job is 404 before any stream starts)."""
    job = get_job(session, organization=organization, job_id=job_id)
    if last_event_id is None:
        return 0
    return event_seq(session, job.id, last_event_id, param="Last-Event-ID")


def poll(url: str, *, job_id: str, after_seq: int, limit: int = BATCH) -> Poll:
    """One short look at the job: its events after `after_seq` and whether it has ended.

    The status is read before the events: a job seen ended has committed every event it wrote
    before its end, so they are all in this read.
    """
    with read_session_scope(url) as session:
        job = session.get(Job, job_id)
        events = list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                .order_by(JobEvent.seq)
                .limit(limit)
            )
        )
    ended = job is not None and job.status in TERMINAL_JOB_STATUSES and len(events) < limit
    return Poll(events=events, ended=job if ended else None)


async def follow(url: str, *, job_id: str, after_seq: int) -> AsyncIterator[JobEvent | Job]:
    """The job's events after `after_seq` as they come, then the ended job; bounded by the
    job's life (a client that goes away cancels it)."""
    while True:
        batch = await anyio.to_thread.run_sync(
            partial(poll, url, job_id=job_id, after_seq=after_seq)
        )
        for event in batch.events:
            after_seq = event.seq
            yield event
        if batch.ended is not None:
            yield batch.ended
            return
        if len(batch.events) < BATCH:
            await anyio.sleep(POLL_SECONDS)
