from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import OrgDep, ReadSessionDep, SessionDep, SettingsDep
from app.api.views import epoch
from app.db.models import WebhookEndpoint
from app.db.session import session_scope
from app.schemas.common import Deleted, Id, ListPage
from app.schemas.webhooks import (
    AttemptRead,
    DeliveryRead,
    WebhookCreate,
    WebhookCreated,
    WebhookRead,
)
from app.webhooks import service as webhooks
from app.webhooks.service import DeliveryAttempts
from app.webhooks.urls import check_url

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=WebhookCreated)
def create_webhook(body: WebhookCreate, org: OrgDep, settings: SettingsDep) -> WebhookCreated:
    """The secret (`whsec_…`) is in this answer only. The URL is checked (SSRF) before any
    database session opens: the check resolves its host."""
    webhooks.check_event_types(body.event_types)
    check_url(body.url, allow_private=settings.webhook_allow_private)
    with session_scope(settings.sqlalchemy_url) as session:
        endpoint = webhooks.create_endpoint(
            session, organization=org, url=body.url, event_types=body.event_types
        )
        return WebhookCreated(**_view(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", response_model=ListPage[WebhookRead])
def list_webhooks(org: OrgDep, session: ReadSessionDep) -> ListPage[WebhookRead]:
    return ListPage(data=[_view(row) for row in webhooks.list_endpoints(session, organization=org)])


@router.delete("/{webhook_id}", response_model=Deleted)
def delete_webhook(webhook_id: Id, org: OrgDep, session: SessionDep) -> Deleted:
    webhooks.delete_endpoint(session, organization=org, webhook_id=webhook_id)
    return Deleted(id=webhook_id, object="webhook_endpoint")


@router.get("/{webhook_id}/deliveries", response_model=ListPage[DeliveryRead])
def list_deliveries(
    webhook_id: Id, org: OrgDep, session: ReadSessionDep, limit: Limit = 20
) -> ListPage[DeliveryRead]:
    rows = webhooks.list_deliveries(session, organization=org, webhook_id=webhook_id, limit=limit)
    return ListPage(data=[_delivery_view(row) for row in rows])


def _view(row: WebhookEndpoint) -> WebhookRead:
    return WebhookRead(
        id=row.id, url=row.url, event_types=row.event_types, created_at=epoch(row.created_at)
    )


def _delivery_view(row: DeliveryAttempts) -> DeliveryRead:
    d = row.delivery
    return DeliveryRead(
        id=d.id, event_id=d.event_id, event_type=d.event_type, status=d.status,
        created_at=epoch(d.created_at), delivered_at=epoch(d.delivered_at),
        next_attempt_at=epoch(d.next_attempt_at),
        attempts=[
            AttemptRead(
                attempted_at=epoch(a.attempted_at), status_code=a.status_code, error=a.error
            )
            for a in row.attempts
        ],
    )  # fmt: skip
