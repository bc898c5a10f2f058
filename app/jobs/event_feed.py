"""Following a job's events as they are written: what `GET …/events?stream=true` sends.

Events come oldest first from a cursor (the internal `seq` of the last event the client saw,
`Last-Event-ID`), until the job has ended and every event before its end has been sent; then
the ended job comes last. Each poll opens a short read-only session and closes it before the
wait (docs/design.md 9.5): an open stream holds no database connection between polls, and the
polls run on worker threads, never on the event loop. A stream lasts at most
`STREAM_MAX_SECONDS` (a job queued for days holds no stream for days: the client reconnects
with `Last-Event-ID`), and re-checks the caller's key as inference streams do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import tenancy
from app.db.models import Job, JobEvent, Organization
from app.db.session import read_session_scope
from app.errors import Unauthorized
from app.jobs.service import event_seq, get_job
from app.statuses import TERMINAL_JOB_STATUSES

POLL_SECONDS = 1.0  # how long a stream waits for new events before it looks again
STREAM_MAX_SECONDS = 3600.0
BATCH = 100  # events read per poll; a backlog is read batch after batch without waiting


@dataclass(frozen=True)
class Poll:
    events: list[JobEvent]  # oldest first, after the cursor
    ended: Job | None  # the job, once it has ended and `events` holds the last of its events
    key_revoked: bool = False


def stream_start(
    session: Session, *, organization: Organization, job_id: str, last_event_id: str | None
) -> int:
    """The cursor a stream starts from: 0, or the seq of `last_event_id` (one of this job's
    events; another organization's job is 404 before any stream starts)."""
    job = get_job(session, organization=organization, job_id=job_id)
    if last_event_id is None:
        return 0
    return event_seq(session, job.id, last_event_id, param="Last-Event-ID")


def poll(
    url: str, *, job_id: str, after_seq: int, key_sha256: str | None = None, limit: int = BATCH
) -> Poll:
    """One short look at the job: its events after `after_seq` and whether it has ended (and,
    given `key_sha256`, whether that key still authenticates).

    The status is read before the events: a job seen ended has committed every event it wrote
    before its end, so they are all in this read.
    """
    with read_session_scope(url) as session:
        if key_sha256 is not None and not tenancy.key_is_active(session, key_sha256=key_sha256):
            return Poll(events=[], ended=None, key_revoked=True)
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


async def follow(
    url: str,
    *,
    job_id: str,
    after_seq: int,
    key_sha256: str | None = None,
    key_check_seconds: float = 0,
) -> AsyncIterator[JobEvent | Job]:
    """The job's events after `after_seq` as they come, then the ended job. Bounded: by the
    job's life, by `STREAM_MAX_SECONDS` (then it just stops), by the client (going away
    cancels it) and by its key (revoked: `Unauthorized`, checked every `key_check_seconds`)."""
    now = anyio.current_time
    deadline, next_key_check = now() + STREAM_MAX_SECONDS, now() + key_check_seconds
    while now() < deadline:
        check_key = key_sha256 if key_check_seconds > 0 and now() >= next_key_check else None
        batch = await anyio.to_thread.run_sync(
            partial(poll, url, job_id=job_id, after_seq=after_seq, key_sha256=check_key)
        )
        if batch.key_revoked:
            raise Unauthorized("the API key of this stream was revoked")
        if check_key is not None:
            next_key_check = now() + key_check_seconds
        for event in batch.events:
            after_seq = event.seq
            yield event
        if batch.ended is not None:
            yield batch.ended
            return
        if len(batch.events) < BATCH:
            await anyio.sleep(POLL_SECONDS)
