"""Queues routed by capability (docs/design.md §9.8): a base model's jobs go to its queue, a
worker claims only the jobs routed to the queues it consumes, a job whose queue no live
worker consumes says so in an event, and the workers the database has seen are listed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Job, JobEvent
from app.db.session import session_scope
from app.jobs import routing, workers
from app.jobs import runs as job_runs
from app.jobs.routing import parse_model_queues, queue_of
from app.jobs.workers import claimable_by
from tests.conftest import make_settings
from tests.factories import submit

ROUTES = "big=gpu-80g,tiny=cpu"


@pytest.fixture
def routed(backend: Settings) -> Settings:
    """Two base models (the same tiny files) routed to two queues, on SQLite and PostgreSQL."""
    tiny = backend.base_models["tiny"]
    return make_settings(
        backend.data_dir,
        tiny,  # type: ignore[arg-type]
        database_url=backend.database_url,
        base_models={"tiny": tiny, "big": tiny},
        model_queues=ROUTES,
    )


def claim(settings: Settings, queues: list[str]) -> str | None:
    with session_scope(settings.sqlalchemy_url) as session:
        taken = job_runs.claim_next(
            session,
            worker=f"w-{'-'.join(queues)}",
            lease_seconds=60,
            max_attempts=3,
            routed=claimable_by(queues, settings.model_queues),
        )
    return taken and taken.job_id


def events(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        query = select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        return list(session.scalars(query))


def test_the_setting_routes_each_named_base_and_the_rest_to_training() -> None:
    routes = parse_model_queues(" llama-8b = gpu-80g , tiny=cpu ")
    assert routes == {"llama-8b": "gpu-80g", "tiny": "cpu"}
    assert queue_of("llama-8b", routes) == "gpu-80g"
    assert queue_of("other", routes) == routing.DEFAULT_QUEUE == "training"


@pytest.mark.parametrize(
    ("value", "named"), [("tiny", "tiny"), ("tiny=a b", "'a b'"), ("tiny=webhooks", "reserved")]
)
def test_a_bad_route_is_refused_naming_it(value: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_model_queues(value)


def test_a_cpu_worker_never_takes_a_gpu_job(routed: Settings) -> None:
    big = submit(routed, model="big")
    assert claim(routed, ["cpu"]) is None  # the gpu-80g job stays queued
    assert claim(routed, ["training"]) is None  # every base is routed elsewhere
    tiny = submit(routed, model="tiny")
    assert claim(routed, ["cpu"]) == tiny
    assert claim(routed, ["gpu-80g", "training"]) == big


def test_the_default_queue_takes_the_bases_not_routed_elsewhere(routed: Settings) -> None:
    only_big = routed.model_copy(update={"model_queues": {"big": "gpu-80g"}})
    big, tiny = submit(only_big, model="big"), submit(only_big, model="tiny")
    assert claim(only_big, ["training"]) == tiny
    assert claim(only_big, ["training"]) is None
    assert claim(only_big, ["gpu-80g"]) == big


def test_a_job_whose_queue_has_no_live_worker_says_so_once(routed: Settings) -> None:
    now = utcnow()
    stale = now - timedelta(seconds=routed.worker_heartbeat_seconds * 4)
    with session_scope(routed.sqlalchemy_url) as session:
        workers.record_heartbeat(session, name="cpu-host:1", queues=["cpu"], now=now)
        workers.record_heartbeat(session, name="gpu-host:1", queues=["gpu-80g"], now=stale)
    big, tiny = submit(routed, model="big"), submit(routed, model="tiny")
    for _ in range(2):  # two sweeps: still one event
        with session_scope(routed.sqlalchemy_url) as session:
            workers.note_waiting_jobs(session, routed, now=now)
    assert events(routed, big).count("waiting for a worker on queue gpu-80g") == 1
    assert not any("waiting" in message for message in events(routed, tiny))


def test_the_listing_marks_silent_workers_not_live(routed: Settings) -> None:
    now = utcnow()
    beat = timedelta(seconds=routed.worker_heartbeat_seconds)
    with session_scope(routed.sqlalchemy_url) as session:
        workers.record_heartbeat(session, name="a:1", queues=["gpu-80g", "training"], now=now)
        workers.record_heartbeat(session, name="b:2", queues=["cpu"], now=now - beat * 4)
        workers.record_heartbeat(session, name="c:3", queues=["cpu"], now=now - timedelta(days=1))
        seen = workers.seen_workers(
            session, now=now, heartbeat_seconds=routed.worker_heartbeat_seconds
        )
        live = workers.live_queues(
            session, now=now, heartbeat_seconds=routed.worker_heartbeat_seconds
        )
    assert [(w.name, w.queues, w.live) for w in seen] == [
        ("a:1", ["gpu-80g", "training"], True),
        ("b:2", ["cpu"], False),
    ]
    assert live == {"gpu-80g", "training"}


def test_the_sweep_resends_a_job_to_its_own_queue(routed: Settings, monkeypatch) -> None:
    from app.jobs import queue
    from app.jobs import sweep as sweeper

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, q: sent.append((job_id, q)))
    monkeypatch.setattr(queue, "pending_messages", lambda queues: None)
    big = submit(routed, model="big")
    with session_scope(routed.sqlalchemy_url) as session:  # its message may be lost: re-sent
        session.get_one(Job, big).enqueued_at = utcnow() - timedelta(hours=1)
    sweeper.sweep_once(routed)
    assert sent == [(big, "gpu-80g")]
    assert "waiting for a worker on queue gpu-80g" in events(routed, big)


def test_a_worker_heartbeat_records_its_queues(routed: Settings) -> None:
    import time

    queues = routed.model_copy(update={"worker_queues": ["gpu-80g", "training"]})
    stop = workers.start_heartbeat(queues, name="beat:1")
    try:
        deadline = time.monotonic() + 30  # the first beat is at once; bounded for a busy CI
        seen: list[workers.SeenWorker] = []
        while not seen and time.monotonic() < deadline:
            with session_scope(routed.sqlalchemy_url) as session:
                seen = workers.seen_workers(
                    session, now=utcnow(), heartbeat_seconds=routed.worker_heartbeat_seconds
                )
            time.sleep(0.05)
    finally:
        stop.set()
    assert [(w.name, w.queues, w.live) for w in seen] == [("beat:1", ["gpu-80g", "training"], True)]
