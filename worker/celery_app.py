"""The Celery application of the worker process (settings shared with the API's client)."""

from __future__ import annotations

from app.config import get_settings
from app.jobs.queue import make_celery

celery_app = make_celery(get_settings())
# The pool process is resident (a stale message costs it milliseconds); each job runs in
# a fresh child of it (worker/supervisor.py): a clean CUDA context, all memory freed.
celery_app.conf.include = ["worker.tasks"]
