"""Queues routed by capability: which Celery queue a base model's jobs go to, and which
jobs a worker consuming some queues may claim (docs/design.md §9.8).

`LORAFORGE_MODEL_QUEUES="llama-8b=gpu-80g,tiny=cpu"` routes each named base model's jobs to
its queue; every other base model's go to `training`. A worker names the queues it consumes
(`loraforge worker --queues gpu-80g,training`, i.e. LORAFORGE_WORKER_QUEUES) and claims only
jobs of the base models routed there (`workers.claimable_by`): the message only wakes it, the
claim decides. Parsing only here: settings read it, and the training core must not import
the database.
"""

from __future__ import annotations

import re

DEFAULT_QUEUE = "training"
RESERVED_QUEUES = frozenset({"webhooks"})  # webhook deliveries, never a training job
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_queue_names(value: str, *, setting: str) -> list[str]:
    """`a,b` as a list of queue names; a bad name raises ValueError naming it and `setting`."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    if not names:
        raise ValueError(f"{setting} names no queue")
    for name in names:
        if not QUEUE_NAME.match(name):
            raise ValueError(
                f"{setting}: {name!r} is not a queue name (letters, digits, '_', '.', '-')"
            )
    return list(dict.fromkeys(names))


def parse_model_queues(value: str) -> dict[str, str]:
    """`base=queue,…` (LORAFORGE_MODEL_QUEUES) as {base model: queue}."""
    setting = "LORAFORGE_MODEL_QUEUES"
    routes: dict[str, str] = {}
    for pair in (item.strip() for item in value.split(",") if item.strip()):
        model, sep, queue = (part.strip() for part in pair.partition("="))
        if not sep or not model or not queue:
            raise ValueError(f"{setting} entry {pair!r} is not base-model=queue")
        (routes[model],) = parse_queue_names(queue, setting=f"{setting} entry {model}")
        if routes[model] in RESERVED_QUEUES:
            raise ValueError(f"{setting} entry {model}: the queue {queue!r} is reserved")
    return routes


def queue_of(base_model: str, routes: dict[str, str]) -> str:
    """The queue a job on `base_model` is sent to."""
    return routes.get(base_model, DEFAULT_QUEUE)
