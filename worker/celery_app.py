"""The Celery application of the worker process (settings shared with the API's client)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from app.config import get_settings
from app.jobs.queue import make_celery
from app.jobs.workers import start_heartbeat
from app.observability import metrics

celery_app = make_celery(get_settings())
# The pool process is resident (a stale message costs it milliseconds); each job runs in
# a fresh child of it (worker/supervisor.py): a clean CUDA context, all memory freed.
celery_app.conf.include = ["worker.tasks"]


@worker_process_init.connect
def _serve_metrics(**_: Any) -> None:
    """Each pool process serves its own registry: the supervisor there observes the runs
    (worker/supervisor.py), so that is where the metrics are."""
    settings = get_settings()
    metrics.limit_adapter_labels(settings.metrics_adapter_labels)
    if settings.worker_metrics_port:
        metrics.serve_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port)


@worker_process_init.connect
def _heartbeat(**_: Any) -> None:
    """Each pool process records the worker and its queues (`workers` table) while it lives,
    so the API can tell a job waits for a worker on its queue (docs/design.md §9.8)."""
    from worker.run_job import WORKER_NAME  # the name its claims write on the job

    start_heartbeat(get_settings(), name=WORKER_NAME)
