"""Workers as the database sees them: each records its queues and a heartbeat; a queued job
whose queue no live worker consumes says so in an event (docs/design.md §9.8).

Who writes "waiting for a worker on queue Q": the job's creation, when no live worker
consumes Q at that moment, and the sweep, for every queued job of such a queue whose latest
event does not already say so (a worker that died after the job was created, a job
re-queued after its worker died). Both are idempotent in effect: one such event per wait.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, false, select, true
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Job, JobEvent, Worker
from app.db.session import unpooled_session_scope
from app.jobs.routing import DEFAULT_QUEUE, queue_of
from app.jobs.service import add_event
from app.statuses import JobStatus

logger = logging.getLogger(__name__)

SILENT_HEARTBEATS = 3  # a worker silent for this many intervals counts as gone
LISTED_FOR = timedelta(hours=1)  # the admin listing shows workers seen this recently


def waiting_message(queue: str) -> str:
    return f"waiting for a worker on queue {queue}"


@dataclass(frozen=True)
class SeenWorker:
    name: str
    queues: list[str]
    started_at: datetime
    last_seen: datetime
    live: bool


def claimable_by(queues: Iterable[str], routes: dict[str, str]) -> ColumnElement[bool]:
    """The jobs a worker consuming `queues` may claim: those whose base model is routed to
    one of them (the default queue also takes every base model not routed elsewhere)."""
    mine = set(queues)
    models = sorted(model for model, queue in routes.items() if queue in mine)
    if DEFAULT_QUEUE in mine:
        others = sorted(model for model, queue in routes.items() if queue not in mine)
        return Job.model.not_in(others) if others else true()
    return Job.model.in_(models) if models else false()


def record_heartbeat(session: Session, *, name: str, queues: list[str], now: datetime) -> None:
    """Insert or refresh this worker's row (only its own process writes it)."""
    row = session.get(Worker, name)
    if row is None:
        session.add(Worker(name=name, queues=queues, started_at=now, last_seen=now))
    else:
        row.queues, row.last_seen = queues, now
    session.flush()


def _live_since(now: datetime, heartbeat_seconds: float) -> datetime:
    return now - timedelta(seconds=heartbeat_seconds * SILENT_HEARTBEATS)


def seen_workers(session: Session, *, now: datetime, heartbeat_seconds: float) -> list[SeenWorker]:
    """Workers seen in the last hour, most recently seen first, each marked live or not."""
    rows = session.scalars(
        select(Worker).where(Worker.last_seen >= now - LISTED_FOR).order_by(Worker.last_seen.desc())
    )
    live_since = _live_since(now, heartbeat_seconds)
    return [
        SeenWorker(row.name, list(row.queues), row.started_at, row.last_seen, live=live)
        for row in rows
        for live in [row.last_seen >= live_since]
    ]


def live_queues(session: Session, *, now: datetime, heartbeat_seconds: float) -> set[str]:
    """The queues some live worker consumes (the rows are few: one per worker process)."""
    rows = session.scalars(
        select(Worker.queues).where(Worker.last_seen >= _live_since(now, heartbeat_seconds))
    )
    return {queue for queues in rows for queue in queues}


def note_if_unserved(session: Session, job: Job, settings: Settings) -> None:
    """At creation: the waiting event when no live worker consumes the job's queue."""
    queue = queue_of(job.model, settings.model_queues)
    live = live_queues(session, now=utcnow(), heartbeat_seconds=settings.worker_heartbeat_seconds)
    if queue not in live:
        add_event(session, job_id=job.id, message=waiting_message(queue))


def note_waiting_jobs(session: Session, settings: Settings, *, now: datetime) -> list[str]:
    """The sweep's part: the waiting event on each queued job of a queue no live worker
    consumes, unless its latest event already says so. Returns the jobs noted."""
    routes = settings.model_queues
    live = live_queues(session, now=now, heartbeat_seconds=settings.worker_heartbeat_seconds)
    latest = (
        select(JobEvent.message)
        .where(JobEvent.job_id == Job.id)
        .order_by(JobEvent.seq.desc())
        .limit(1)
        .correlate(Job)
        .scalar_subquery()
    )
    unserved = {*routes.values(), DEFAULT_QUEUE}
    noted = []
    for queue in sorted(unserved - live):
        rows = session.execute(
            select(Job.id, latest).where(
                Job.status == JobStatus.QUEUED, claimable_by([queue], routes)
            )
        )
        for job_id, message in rows:
            if message != waiting_message(queue):
                add_event(session, job_id=job_id, message=waiting_message(queue))
                noted.append(job_id)
    return noted


def start_heartbeat(settings: Settings, *, name: str) -> threading.Event:
    """Record this worker now and every `worker_heartbeat_seconds`; set the event to stop.
    A failed beat (the database away) is logged and retried at the next interval. Each beat
    has a connection of its own: the pool process forks a child per job."""
    stop = threading.Event()

    def beat() -> None:
        try:
            with unpooled_session_scope(settings.sqlalchemy_url) as session:
                record_heartbeat(session, name=name, queues=settings.worker_queues, now=utcnow())
        except Exception:
            logger.warning("worker heartbeat failed; retrying", exc_info=True)

    def loop() -> None:
        beat()
        while not stop.wait(settings.worker_heartbeat_seconds):
            beat()

    threading.Thread(target=loop, name="loraforge-heartbeat", daemon=True).start()
    return stop
