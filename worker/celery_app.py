"""The Celery application of the worker process (settings shared with the API's client)."""

from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

celery_app = make_celery(get_settings())
# A fresh child process per job gives each job a clean CUDA context and frees all memory.
celery_app.conf.worker_max_tasks_per_child = 1
celery_app.conf.include = ["worker.tasks"]
