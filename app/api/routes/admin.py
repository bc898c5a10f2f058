"""Admin API: API keys of every organization, behind the admin key (LORAFORGE_ADMIN_KEY)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from app import tenancy
from app.api.deps import AdminDep, ReadSessionDep, SessionDep
from app.api.views import api_key_view
from app.db.session import commit
from app.schemas.common import Id, ListPage

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
