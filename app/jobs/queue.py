"""The Celery client and its settings, shared by the API (sender) and the worker.

The API sends by task name and never imports `worker` (docs/design.md §2). The database is
the source of truth; a message is only a wake-up call carrying a job id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Celery

from app.config import Settings, get_settings
from app.jobs.routing import DEFAULT_QUEUE, queue_of

logger = logging.getLogger(__name__)

TRAIN_TASK = "loraforge.train"
TRAIN_QUEUE = DEFAULT_QUEUE  # base models not routed elsewhere (app/jobs/routing.py)

# What sending raises while the broker is unreachable: kombu turns the transport's connection
# errors into OperationalError (Redis refusing or gone, an unknown host); Redis's own and the
# socket's can surface unwrapped on an established connection, and the filesystem broker's
# are OSErrors. Anything else (an unknown transport in the URL, a bug) is not an outage.
BROKER_UNREACHABLE = (
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "task_ignore_result": True,
        # Long GPU jobs: ack after the run, redeliver if the worker dies, one at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": TRAIN_QUEUE,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if settings.broker_url is None:
        folder = settings.broker_dir / "messages"
        folder.mkdir(parents=True, exist_ok=True)
        (settings.broker_dir / "processed").mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
        }
    else:
        # Redelivery after visibility_timeout is harmless (the claim fences it); keep it
        # above a typical job so duplicates stay rare. Scan for overdue messages about three
        # times per timeout (kombu's default scans every 100 s whatever the timeout).
        timeout = settings.broker_visibility_timeout
        config["broker_transport_options"] = {
            "visibility_timeout": timeout,
            "unacked_restore_interval": max(1, min(100, timeout // 3)),
            "unacked_restore_throttle": 1,
        }
        # On Redis a busy `-c 1` worker still reserves one more message (celery#2788): a
        # wake-up then waits behind a whole job (its wake loop runs jobs back to back) while
        # another worker idles. The multi-host simulation measured a 24 s dispatch p99 from
        # it (docs/scaling.md). Take a message only with a free process (Celery 5.5+).
        config["worker_disable_prefetch"] = True
    return config


def make_celery(settings: Settings) -> Celery:
    app = Celery("loraforge")
    app.conf.update(celery_config(settings))
    return app


@lru_cache
def _client() -> Celery:
    return make_celery(get_settings())


def enqueue_training(job_id: str, queue: str = TRAIN_QUEUE) -> bool:
    """Send the wake-up message to the job's `queue` (`routing.queue_of` its base model);
    False if the broker is unreachable (the sweep retries)."""
    try:
        _client().send_task(TRAIN_TASK, args=[job_id], queue=queue, retry=False)
    except BROKER_UNREACHABLE:  # the job row is committed: the sweep will re-send
        logger.warning("could not enqueue job %s; the sweep will retry", job_id, exc_info=True)
        return False
    return True


def wake_job(job_id: str, base_model: str, settings: Settings) -> bool:
    """`enqueue_training` on the queue its base model is routed to (LORAFORGE_MODEL_QUEUES)."""
    return enqueue_training(job_id, queue_of(base_model, settings.model_queues))


def pending_messages(queues: Iterable[str] = (TRAIN_QUEUE,)) -> int | None:
    """Messages waiting in the training `queues`; None when the broker cannot say (or is
    down)."""
    if get_settings().broker_url is None:
        return None  # the filesystem broker: no cheap count; the sweep re-sends as before
    try:
        with _client().connection_for_read() as connection:
            client = connection.default_channel.client
            return sum(int(client.llen(queue)) for queue in queues)
    except Exception:
        logger.warning("could not count the training queues", exc_info=True)
        return None
