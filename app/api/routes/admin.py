"""Admin API, behind the admin key (LORAFORGE_ADMIN_KEY): API keys of every organization,
the inference engine's KV cache across organizations (a tenant sees only its own), and the
workers the database has seen recently with their queues."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel

from app import tenancy
from app.api.deps import AdminDep, ReadSessionDep, SessionDep, SettingsDep
from app.api.views import api_key_view
from app.db.base import utcnow
from app.db.session import commit
from app.jobs import workers
from app.schemas.common import Id, ListPage
from app.schemas.inference import EngineCacheList, EngineCacheTotals

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])
OrgName = Annotated[str, Path(pattern=tenancy.ORG_NAME.pattern)]


class ApiKeyRead(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    organization: str
    prefix: str
    created_at: int
    revoked_at: int | None


class ApiKeyCreated(ApiKeyRead):
    secret: str  # shown once, never stored


@router.post("/organizations/{organization}/keys", response_model=ApiKeyCreated)
def create_key(organization: OrgName, session: SessionDep) -> ApiKeyCreated:
    org = tenancy.get_or_create_organization(session, name=organization)
    key, secret = tenancy.issue_api_key(session, organization=org)
    commit(session)
    return ApiKeyCreated(**api_key_view(key, org.name), secret=secret)


@router.get("/keys", response_model=ListPage[ApiKeyRead])
def list_keys(
    session: ReadSessionDep, organization: Annotated[Id | None, Query(max_length=64)] = None
) -> ListPage[ApiKeyRead]:
    rows = tenancy.list_api_keys(session, organization=organization)
    return ListPage(data=[ApiKeyRead(**api_key_view(key, name)) for key, name in rows])


@router.post("/keys/{key_id}/revoke", response_model=ApiKeyRead)
def revoke_key(key_id: Annotated[Id, Path(max_length=64)], session: SessionDep) -> ApiKeyRead:
    key = tenancy.revoke_key(session, key_id=key_id)
    return ApiKeyRead(**api_key_view(key, tenancy.organization_name(session, key)))


@router.get("/engine/cache", response_model=EngineCacheList)
def engine_cache(request: Request) -> EngineCacheList:
    """Per base model: the KV budget, every organization's use of it, and the padding
    counters. Never starts the engine."""
    engine = getattr(request.app.state, "engine", None)
    bases = [] if engine is None else engine.stats()["base_models"]
    return EngineCacheList(
        data=[
            EngineCacheTotals(
                name=base["name"],
                running=base["running"],
                waiting=base["waiting"],
                steps=base["steps"],
                **base["kv_cache"],
            )
            for base in bases
        ]
    )


class WorkerRead(BaseModel):
    name: str  # host:pid, as the jobs it claims name it
    object: Literal["worker"] = "worker"
    queues: list[str]
    started_at: int
    last_seen: int
    live: bool  # heard from within 3 heartbeats (LORAFORGE_WORKER_HEARTBEAT_SECONDS)


@router.get("/workers", response_model=ListPage[WorkerRead])
def list_workers(session: ReadSessionDep, settings: SettingsDep) -> ListPage[WorkerRead]:
    """Workers seen in the last hour, most recent first, with the queues they consume."""
    seen = workers.seen_workers(
        session, now=utcnow(), heartbeat_seconds=settings.worker_heartbeat_seconds
    )
    return ListPage(
        data=[
            WorkerRead(
                name=w.name,
                queues=w.queues,
                started_at=int(w.started_at.timestamp()),
                last_seen=int(w.last_seen.timestamp()),
                live=w.live,
            )
            for w in seen
        ]
    )
