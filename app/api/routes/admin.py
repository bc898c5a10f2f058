"""Admin API, behind the admin key (LORAFORGE_ADMIN_KEY): API keys of every organization,
and the inference engine's KV cache across organizations (a tenant sees only its own)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel

from app import tenancy
from app.api.deps import AdminDep, ReadSessionDep, SessionDep
from app.api.views import api_key_view
from app.db.session import commit
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
