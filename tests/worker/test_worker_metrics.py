"""The worker's metrics (issue 11 §4): a job run moves the jobs gauge, the queue-wait and
run-time histograms and the training counters, which the supervising process reads from the
job's row (the child that trains writes its progress there); a pool process serves them on
its own loopback port. Training is stubbed (tests/worker/test_run_job.py trains for real)."""

from __future__ import annotations

import socket

import httpx

from app.db.session import session_scope
from app.jobs import runs as job_runs
from app.observability import metrics
from tests.factories import submit
from tests.metrics_text import samples, value
from worker import run_job as run_job_module
from worker import supervisor


def trains_then_fails(claim, settings, _store, _progress) -> None:
    """Training stand-in: reports 3 steps and 120 tokens, as a step does, then fails."""
    with session_scope(settings.sqlalchemy_url) as session:
        progress = {"steps_completed": 3, "trained_tokens": 120}
        job_runs.renew_lease(session, claim=claim, lease_seconds=60, progress=progress)
    raise run_job_module.JobInputError("stand-in", code="stand_in")


def scrape(settings) -> dict:
    return samples(metrics.exposition(url=settings.sqlalchemy_url, engine=None).decode())


def test_a_job_run_moves_the_gauge_the_histograms_and_the_counters(settings, monkeypatch):
    monkeypatch.setattr(run_job_module, "_train_and_publish", trains_then_fails)
    job_id = submit(settings)
    before = scrape(settings)
    assert value(before, "loraforge_jobs", status="queued") == 1
    assert supervisor.wake(job_id, settings=settings) == [f"{job_id}: failed"]
    after = scrape(settings)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "loraforge_jobs", status="queued") == 0
    assert value(after, "loraforge_jobs", status="failed") == 1
    assert moved("loraforge_job_queue_wait_seconds_count") == 1
    assert moved("loraforge_job_run_seconds_count", outcome="failed") == 1
    assert moved("loraforge_training_steps_total") == 3
    assert moved("loraforge_training_tokens_total") == 120
    assert value(after, "loraforge_training_tokens_per_second") == 0  # idle again


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_pool_process_serves_its_metrics_on_its_port():
    port = free_port()
    server = metrics.serve_worker_metrics("127.0.0.1", port)
    assert server is not None
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert answer.status_code == 200
        found = samples(answer.text)
        assert ("loraforge_training_steps_total", frozenset()) in found
        # a second process of the same worker (--concurrency 2) takes the next free port
        second = metrics.serve_worker_metrics("127.0.0.1", port)
        assert second is not None and second.server_port != port
        second.shutdown()
        second.server_close()
    finally:
        server.shutdown()
        server.server_close()


def test_no_free_port_is_logged_not_raised(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert metrics.serve_worker_metrics("127.0.0.1", port, tries=1) is None
    assert "no free port" in caplog.text
