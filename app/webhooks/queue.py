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
    client = job_queue._client()  # the process's one Celery app
    try:
        # A connection of its own, not the app's pool: this runs in forked job processes too
        # (a job ends there), and a pooled socket inherited through os.fork would be shared.
        with client.connection_for_write() as connection:
            client.send_task(
                DELIVER_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE, retry=False,
                connection=connection,
            )  # fmt: skip
    except job_queue.BROKER_UNREACHABLE:
        logger.warning("could not enqueue webhook delivery %s; the sweep retries", delivery_id)
        return False
    except Exception:  # after a commit nothing may fail the caller: the sweep re-sends
        logger.exception("could not enqueue webhook delivery %s", delivery_id)
        return False
    return True
