"""Webhook endpoints of an organization: create (the secret returned once), list, delete, and
the deliveries made to one. Another organization's endpoint is NotFound, like an unknown id.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app.db.models import Organization, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.errors import InvalidRequest, NotFound
from app.ids import new_id
from app.webhooks.outbox import EVENT_TYPES
from app.webhooks.signing import new_secret

MAX_ENDPOINTS_PER_ORG = 20  # every event fans out to each one


@dataclass(frozen=True)
class DeliveryAttempts:
    delivery: WebhookDelivery
    attempts: list[WebhookAttempt]


def check_event_types(event_types: list[str]) -> list[str]:
    unknown = sorted(set(event_types) - EVENT_TYPES)
    if unknown or not event_types:
        raise InvalidRequest(
            f"unknown event types {unknown}; choose from {sorted(EVENT_TYPES)}"
            if unknown
            else f"event_types is empty; choose from {sorted(EVENT_TYPES)}",
            param="event_types",
        )
    return sorted(set(event_types))


def create_endpoint(
    session: Session, *, organization: Organization, url: str, event_types: list[str]
) -> WebhookEndpoint:
    """`url` must already have passed `urls.check_url` (a DNS lookup: no session waits on
    it). The returned row carries the secret: show it in this answer only."""
    count = len(list(session.scalars(_endpoints(organization.id))))
    if count >= MAX_ENDPOINTS_PER_ORG:
        raise InvalidRequest(
            f"an organization has at most {MAX_ENDPOINTS_PER_ORG} webhook endpoints; delete one",
            param="url",
        )
    endpoint = WebhookEndpoint(
        id=new_id("wh"), organization_id=organization.id, url=url,
        event_types=check_event_types(event_types), secret=new_secret(),
    )  # fmt: skip
    session.add(endpoint)
    session.flush()
    return endpoint


def list_endpoints(session: Session, *, organization: Organization) -> list[WebhookEndpoint]:
    return list(session.scalars(_endpoints(organization.id)))


def get_endpoint(
    session: Session, *, organization: Organization, webhook_id: str
) -> WebhookEndpoint:
    endpoint = session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == webhook_id, WebhookEndpoint.organization_id == organization.id
        )
    )
    if endpoint is None:
        raise NotFound(f"No webhook endpoint with id {webhook_id!r}", param="webhook_id")
    return endpoint


def delete_endpoint(session: Session, *, organization: Organization, webhook_id: str) -> None:
    """The endpoint and its deliveries go: nothing more is sent to it."""
    endpoint = get_endpoint(session, organization=organization, webhook_id=webhook_id)
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id)
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.flush()


def list_deliveries(
    session: Session, *, organization: Organization, webhook_id: str, limit: int
) -> list[DeliveryAttempts]:
    """The endpoint's newest `limit` deliveries, each with its attempts, oldest first."""
    endpoint = get_endpoint(session, organization=organization, webhook_id=webhook_id)
    deliveries = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(limit)
        )
    )
    attempts: dict[str, list[WebhookAttempt]] = {row.id: [] for row in deliveries}
    for attempt in session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(attempts))
        .order_by(WebhookAttempt.id)
    ):
        attempts[attempt.delivery_id].append(attempt)
    return [DeliveryAttempts(row, attempts[row.id]) for row in deliveries]


def _endpoints(organization_id: str) -> Select[WebhookEndpoint]:
    return (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.organization_id == organization_id)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
