from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api import idempotency
from app.api.deps import OrgDep, ReadSessionDep, SessionDep, SettingsDep
from app.api.errors import domain_error
from app.api.idempotency import IdempotencyHeader
from app.api.views import checkpoint_view, event_view, job_view
from app.config import Settings
from app.db.models import Job, JobEvent
from app.errors import InvalidRequest, LoraforgeError
from app.jobs import event_feed, queue, workers
from app.jobs import pause as pausing
from app.jobs import service as jobs
from app.jobs.limits import WorkLimits
from app.schemas.common import Id, ListPage
from app.schemas.jobs import CheckpointRead, EventRead, JobCreate, JobRead
from app.statuses import JobStatus

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]


DEFERRED: dict[int | str, dict[str, Any]] = {
    202: {
        "model": JobRead,
        "description": "Created; the broker is unreachable, so the "
        "wake-up message is deferred to the sweep (the job is queued all the same)",
    }
}


@router.post("", response_model=JobRead, responses=DEFERRED)
def create_job(
    body: JobCreate,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> JobRead:
    digest = idempotency.request_sha256(body.model_dump_json())
    scope = idempotency.Scope(organization=org, endpoint="jobs", key=idempotency_key, digest=digest)
    earlier = idempotency.replayed_id(session, **scope)
    if earlier is not None:  # a replay: the same job, never a second one
        return job_view(jobs.get_job(session, organization=org, job_id=earlier))
    jobs.check_active_quota(session, organization=org, limit=settings.max_active_jobs)
    job = jobs.create_job(
        session,
        organization=org,
        request=body,
        base_models=settings.base_models,
        limits=WorkLimits.of(settings),
        mlflow_tracking_uris=settings.mlflow_tracking_uris,
    )
    workers.note_if_unserved(session, job, settings)  # "waiting for a worker on queue …"
    # Committed before enqueueing: the worker must find the row when the message arrives.
    job_id = idempotency.commit_once(session, **scope, object_id=job.id)
    if job_id == job.id and not queue.wake_job(job.id, job.model, settings):
        response.status_code = 202
    return job_view(jobs.get_job(session, organization=org, job_id=job_id))


@router.get("", response_model=ListPage[JobRead])
def list_jobs(
    org: OrgDep, session: ReadSessionDep, after: Id | None = None, limit: Limit = 20
) -> ListPage[JobRead]:
    page = jobs.list_jobs(session, organization=org, after=after, limit=limit)
    return ListPage(data=[job_view(job) for job in page.rows], has_more=page.has_more)


@router.get("/{job_id}", response_model=JobRead)
def retrieve_job(job_id: Id, org: OrgDep, session: ReadSessionDep) -> JobRead:
    return job_view(jobs.get_job(session, organization=org, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: Id, org: OrgDep, session: SessionDep) -> JobRead:
    return job_view(jobs.cancel_job(session, organization=org, job_id=job_id))


@router.post("/{job_id}/pause", response_model=JobRead)
def pause_job(job_id: Id, org: OrgDep, session: SessionDep) -> JobRead:
    """A queued job is held; a running one checkpoints at its next step and shows `paused`."""
    return job_view(pausing.pause_job(session, organization=org, job_id=job_id))


@router.post("/{job_id}/resume", response_model=JobRead)
def resume_job(job_id: Id, org: OrgDep, session: SessionDep, settings: SettingsDep) -> JobRead:
    """A paused job is queued again and continues from its checkpoint."""
    job = pausing.resume_job(session, organization=org, job_id=job_id)
    session.commit()  # before the message: the worker must find the job queued
    if job.status == JobStatus.QUEUED:
        queue.wake_job(job.id, job.model, settings)  # unreachable broker: the sweep re-sends
    return job_view(job)


EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or with stream=true Server-Sent Events: each event (`id:` its "
        "id, `data:` the event object), oldest first, after `Last-Event-ID`; once the job has "
        "ended, one `event: end` whose data is the job. A stream lasts at most an hour (reconnect "
        "with Last-Event-ID); a revoked key ends it with `event: error` (OpenAI's envelope)",
    }
}


@router.get("/{job_id}/events", response_model=ListPage[EventRead], responses=EVENT_STREAM)
def list_events(
    job_id: Id,
    org: OrgDep,
    http: Request,
    session: ReadSessionDep,
    settings: SettingsDep,
    after: Id | None = None,
    limit: Limit = 20,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header(max_length=255)] = None,
) -> ListPage[EventRead] | EventSourceResponse:
    if stream:
        if after is not None:
            raise InvalidRequest("a stream resumes after Last-Event-ID, not after", param="after")
        start = event_feed.stream_start(
            session, organization=org, job_id=job_id, last_event_id=last_event_id
        )
        return _event_stream(http, settings, job_id=job_id, after_seq=start)
    page = jobs.list_events(session, organization=org, job_id=job_id, after=after, limit=limit)
    return ListPage(data=[event_view(event) for event in page.rows], has_more=page.has_more)


def _event_stream(
    http: Request, settings: Settings, *, job_id: str, after_seq: int
) -> EventSourceResponse:
    feed = event_feed.follow(
        settings.sqlalchemy_url,
        job_id=job_id,
        after_seq=after_seq,
        key_sha256=http.state.key_sha256,
        key_check_seconds=settings.stream_key_check_seconds,
    )
    return EventSourceResponse(_server_sent(feed), send_timeout=30)


async def _server_sent(feed: AsyncIterator[JobEvent | Job]) -> AsyncIterator[ServerSentEvent]:
    try:
        async for item in feed:
            if isinstance(item, Job):
                yield ServerSentEvent(event="end", data=job_view(item).model_dump_json())
            else:
                yield ServerSentEvent(id=item.public_id, data=event_view(item).model_dump_json())
    except LoraforgeError as exc:  # a revoked key, once the 200 is sent: an error event
        yield ServerSentEvent(event="error", data=json.dumps(domain_error(exc)[1]))


@router.get("/{job_id}/checkpoints", response_model=ListPage[CheckpointRead])
def list_checkpoints(
    job_id: Id, org: OrgDep, session: ReadSessionDep, after: Id | None = None, limit: Limit = 10
) -> ListPage[CheckpointRead]:
    page = jobs.list_checkpoints(session, organization=org, job_id=job_id, after=after, limit=limit)
    data = [checkpoint_view(row) for row in page.rows]
    return ListPage(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
