"""The delivery wake-up message: a Celery task on its own queue (`webhooks`), so a delivery
never waits behind a training job; the row is the truth, the message only a nudge."""

from __future__ import annotations

import logging

from app.jobs import queue as job_queue

logger = logging.getLogger(__name__)

DELIVER_TASK = "loraforge.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"


def enqueue_delivery(delivery_id: str) -> bool:
    """False if the broker is unreachable: the row stays due and the sweep re-sends it."""
    try:
        job_queue._client().send_task(  # one Celery client per process
            DELIVER_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE, retry=False
        )
    except job_queue.BROKER_UNREACHABLE:
        logger.warning("could not enqueue webhook delivery %s; the sweep retries", delivery_id)
        return False
    except Exception:  # after a commit nothing may fail the caller: the sweep re-sends
        logger.exception("could not enqueue webhook delivery %s", delivery_id)
        return False
    return True
