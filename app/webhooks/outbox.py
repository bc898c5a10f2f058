"""The outbox: a job's end becomes one delivery row per subscribed endpoint, written in the
transaction that ends the job, so the event exists exactly when the end does (a rollback
leaves neither). After that transaction commits, a message wakes a delivery; if it is lost
(broker down, process killed) the sweep sends the due rows again (`delivery.due_deliveries`,
`app/jobs/sweep.py resend_due_webhooks`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, WebhookDelivery, WebhookEndpoint
from app.ids import new_id
from app.statuses import JobStatus
from app.webhooks import queue

JOB_EVENT_TYPES = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
EVENT_TYPES = frozenset(JOB_EVENT_TYPES.values())
_WAKE = "loraforge_webhook_deliveries"  # session.info key: rows to wake after the commit


def record_job_ended(session: Session, *, job_id: str, status: JobStatus) -> list[str]:
    """Write the outbox rows of a job that just became `status` (terminal), in the caller's
    transaction. Every place a job ends calls this; returns the delivery ids."""
    event_type = JOB_EVENT_TYPES[status]
    org_id = session.scalar(select(Job.organization_id).where(Job.id == job_id))
    endpoints = [
        endpoint
        for endpoint in session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.organization_id == org_id)
        )
        if event_type in endpoint.event_types
    ]
    if not endpoints:
        return []
    now = utcnow()
    body = _payload(event_id=new_id("evt"), event_type=event_type, job_id=job_id, at=now)
    rows = [
        WebhookDelivery(
            id=new_id("msg"), endpoint_id=endpoint.id, organization_id=endpoint.organization_id,
            event_id=body["id"], event_type=event_type, payload=json.dumps(body),
            next_attempt_at=now, enqueued_at=now,
        )
        for endpoint in endpoints
    ]  # fmt: skip
    session.add_all(rows)
    _wake_after_commit(session, [row.id for row in rows])
    return [row.id for row in rows]


def _payload(*, event_id: str, event_type: str, job_id: str, at: datetime) -> dict[str, Any]:
    """OpenAI's webhook event shape."""
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(at.timestamp()),
        "data": {"id": job_id},
    }


def _wake_after_commit(session: Session, delivery_ids: list[str]) -> None:
    """Send the deliveries' messages once the transaction has committed (never before: a
    delivery must not run ahead of its row), and forget them if it rolls back."""
    session.info.setdefault(_WAKE, []).extend(delivery_ids)
    if not event.contains(session, "after_commit", _send_messages):
        event.listen(session, "after_commit", _send_messages)
        event.listen(session, "after_rollback", _forget_messages)


def _send_messages(session: Session) -> None:
    for delivery_id in session.info.pop(_WAKE, []):
        queue.enqueue_delivery(delivery_id)


def _forget_messages(session: Session) -> None:
    session.info.pop(_WAKE, None)
