"""Sending the outbox: one attempt per call, at least once, never holding a session on the
network (docs/design.md 4.12, 9.5).

An attempt first claims its row (one conditional UPDATE: pending and due; it pushes
`next_attempt_at` one `SEND_LEASE` ahead, so a concurrent task or sweep does not send it
again while it is in flight, and a process killed mid-send leaves it due again), then
checks the URL (SSRF, again: DNS may have changed) and POSTs the signed body to the checked
address, then records the attempt and schedules the next one by `SCHEDULE`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.db.session import session_scope
from app.errors import InvalidRequest, public_message
from app.statuses import DeliveryStatus
from app.webhooks.signing import signed_headers
from app.webhooks.urls import Target, check_url

logger = logging.getLogger(__name__)

# "Now" for scheduling; tests move it on instead of waiting hours. Signatures always carry
# the wall-clock time (receivers refuse timestamps more than five minutes off).
clock: Callable[[], datetime] = utcnow

# Seconds to wait before each attempt (the first at once): the Standard Webhooks / Svix
# schedule, about 27 hours in all; a delivery fails after the last.
SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
SEND_LEASE = timedelta(seconds=60)  # longer than one attempt can take (TIMEOUT)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DUE_BATCH = 100  # rows the sweep re-sends per round


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    attempt: int
    url: str
    secret: str
    payload: str


def deliver(
    settings: Settings, delivery_id: str, *, transport: httpx.BaseTransport | None = None
) -> DeliveryStatus | None:
    """Make one attempt if the delivery is due; its status after it, or None if not due
    (delivered, failed for good, in flight elsewhere, or its endpoint deleted)."""
    with session_scope(settings.sqlalchemy_url) as session:
        claimed = _claim(session, delivery_id)
    if claimed is None:
        return None
    try:
        status_code, error = send(
            claimed, allow_private=settings.webhook_allow_private, transport=transport
        )
    except Exception as exc:  # recorded like any failed attempt, and retried by the schedule
        logger.exception("webhook delivery %s failed", delivery_id)
        status_code, error = None, f"could not send: {public_message(exc)}"[:500]
    with session_scope(settings.sqlalchemy_url) as session:
        return _record(session, claimed, status_code, error)


def _claim(session: Session, delivery_id: str) -> Claimed | None:
    now = clock()
    taken = session.execute(  # type: ignore[attr-defined]  # DML returns a CursorResult
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(next_attempt_at=now + SEND_LEASE, attempts=WebhookDelivery.attempts + 1)
    ).rowcount
    if taken != 1:
        return None
    row = session.execute(
        select(WebhookDelivery.attempts, WebhookEndpoint.url, WebhookEndpoint.secret,
               WebhookDelivery.payload)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)
    ).one()  # fmt: skip
    return Claimed(delivery_id, row.attempts, row.url, row.secret, row.payload)


def send(
    claimed: Claimed, *, allow_private: bool, transport: httpx.BaseTransport | None = None
) -> tuple[int | None, str | None]:
    """POST the signed body; (status code, None) on a 2xx, else what went wrong."""
    try:
        target = check_url(claimed.url, allow_private=allow_private)
    except InvalidRequest as refused:
        return None, refused.message
    headers = signed_headers(
        secret=claimed.secret, webhook_id=claimed.delivery_id, body=claimed.payload, at=utcnow()
    )
    headers |= {"content-type": "application/json", "user-agent": "loraforge-webhooks"}
    try:
        # No proxies from the environment (they would connect elsewhere than the checked
        # address) and no redirects (a 3xx could point anywhere, an internal host included).
        with httpx.Client(
            timeout=TIMEOUT, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            request = _pinned_request(client, target, headers, claimed.payload)
            response = client.send(request, stream=True)
            response.close()  # the status is all we need; the body is never read
    except httpx.HTTPError as exc:
        return None, public_message(exc)[:500]
    code = response.status_code
    if 200 <= code < 300:
        return code, None
    if 300 <= code < 400:
        return code, f"the receiver answered {code}, a redirect; redirects are not followed"
    return code, f"the receiver answered {code}"


def _pinned_request(
    client: httpx.Client, target: Target, headers: dict[str, str], body: str
) -> httpx.Request:
    """A request to the checked IP that still names the host (Host header, TLS SNI and
    certificate check), so the connection goes exactly where the check looked."""
    url = httpx.URL(target.url)
    host_header = url.netloc.decode("ascii")  # host[:port] as written, never the userinfo
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return client.build_request(
        "POST", url.copy_with(host=target.address), content=body.encode(),
        headers={**headers, "host": host_header}, extensions=extensions,
    )  # fmt: skip


def _record(
    session: Session, claimed: Claimed, status_code: int | None, error: str | None
) -> DeliveryStatus | None:
    if session.get(WebhookDelivery, claimed.delivery_id) is None:
        return None  # its endpoint was deleted while the attempt was in flight
    now = clock()
    session.add(
        WebhookAttempt(
            delivery_id=claimed.delivery_id, attempted_at=now, status_code=status_code,
            error=error,
        )
    )  # fmt: skip
    if error is None:
        values = {"status": DeliveryStatus.DELIVERED, "delivered_at": now, "next_attempt_at": None}
    elif claimed.attempt >= len(SCHEDULE):
        values = {"status": DeliveryStatus.FAILED, "next_attempt_at": None}
    else:
        values = {"next_attempt_at": now + timedelta(seconds=SCHEDULE[claimed.attempt])}
    # Only a pending row changes: an earlier attempt whose lease lapsed may have delivered it.
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(**values)
    )
    status = session.execute(
        select(WebhookDelivery.status).where(WebhookDelivery.id == claimed.delivery_id)
    ).scalar_one()
    return DeliveryStatus(status)


def due_deliveries(session: Session, *, requeue_after_seconds: int) -> list[str]:
    """The sweep's part: pending rows that are due and have no message on its way (none
    sent since they became due, or the last one sent longer than `requeue_after_seconds`
    ago: lost). Marks them sent; the caller sends the messages after the commit."""
    now = clock()
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(
                    WebhookDelivery.enqueued_at.is_(None),
                    WebhookDelivery.enqueued_at < WebhookDelivery.next_attempt_at,
                    WebhookDelivery.enqueued_at < now - timedelta(seconds=requeue_after_seconds),
                ),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(DUE_BATCH)
        )
    )
    for row in rows:
        row.enqueued_at = now
    session.flush()
    return [row.id for row in rows]
