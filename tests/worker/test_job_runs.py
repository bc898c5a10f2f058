"""The worker-side lifecycle (app/jobs/runs.py) on a real database, without training."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.db.models import Job
from app.db.session import session_scope
from app.jobs import publishing
from app.jobs import runs as job_runs
from tests.factories import submit


def claim(settings, job_id: str, *, lease_seconds: int, worker: str = "w") -> job_runs.Claim:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.claim_job(
            session, job_id=job_id, worker=worker, lease_seconds=lease_seconds, max_attempts=3
        )


def sweep(settings) -> list[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.sweep(session, requeue_after_seconds=3600, max_attempts=3)


def keeper_of(job_id: str) -> threading.Thread:
    """The thread `keep_lease` renews the job's lease from."""
    [keeper] = [thread for thread in threading.enumerate() if thread.name == f"lease-{job_id}"]
    return keeper


def gives_up(keeper: threading.Thread) -> bool:
    """True once the keeper stopped by itself (it does when a renewal is refused)."""
    keeper.join(timeout=60)
    return not keeper.is_alive()


def status(settings, job_id: str) -> str:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def test_keep_lease_holds_a_job_through_a_phase_without_steps(settings, lease_clock):
    """Loading a base model or saving a checkpoint takes no step; the lease must not lapse."""
    job_id = submit(settings)
    held = claim(settings, job_id, lease_seconds=1)
    with job_runs.keep_lease(settings.sqlalchemy_url, claim=held, lease_seconds=1):
        for _ in range(3):  # 2.7 s in all, longer than the lease: only the keeper renews it
            lease_clock.advance(0.9)
            lease_clock.wait_for_reads(2)  # so a renewal that read the new time has finished
        assert sweep(settings) == [] and status(settings, job_id) == "running"
    lease_clock.advance(1.5)  # the keeper stopped with the run: the lease now lapses
    assert sweep(settings) == [job_id] and status(settings, job_id) == "queued"


def test_keep_lease_stops_renewing_once_the_job_is_cancelled(settings, lease_clock):
    job_id = submit(settings)
    held = claim(settings, job_id, lease_seconds=1)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).cancel_requested = True
    with job_runs.keep_lease(settings.sqlalchemy_url, claim=held, lease_seconds=1):
        assert gives_up(keeper_of(job_id))  # its first renewal found the job cancelled
        lease_clock.advance(2.5)  # a run stuck before its next step: the sweep ends it as cancelled
        assert sweep(settings) == [] and status(settings, job_id) == "cancelled"
    with session_scope(settings.sqlalchemy_url) as session, pytest.raises(job_runs.RunAborted):
        job_runs.renew_lease(session, claim=held, lease_seconds=1)


def test_keep_lease_does_not_renew_a_lease_taken_over_by_another_attempt(settings, lease_clock):
    job_id = submit(settings)
    stale = claim(settings, job_id, lease_seconds=1, worker="old")
    with job_runs.keep_lease(settings.sqlalchemy_url, claim=stale, lease_seconds=1):
        keeper = keeper_of(job_id)
        with session_scope(settings.sqlalchemy_url) as session:  # one transaction: no beat between
            session.get(Job, job_id).lease_expires_at = lease_clock.now - timedelta(seconds=1)
            session.flush()
            fresh = job_runs.claim_job(
                session, job_id=job_id, worker="new", lease_seconds=60, max_attempts=3
            )
        assert gives_up(keeper)  # its next renewal found the lease taken over
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get_one(Job, job_id)
        assert (job.attempt, job.worker, fresh.attempt) == (2, "new", 2)
        # a renewal by the stale keeper would have cut the lease to 1 s
        assert job.lease_expires_at > lease_clock.now + timedelta(seconds=30)


def test_the_sweep_removes_what_a_dead_attempt_left_but_keeps_recorded_checkpoints(
    settings, monkeypatch
):
    import os

    from app.jobs import queue
    from app.jobs import sweep as sweeper
    from app.storage import LocalStore

    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, queue=None: True)
    job_id = submit(settings)
    held = claim(settings, job_id, lease_seconds=60)
    folder = LocalStore(settings.artifacts_dir).path(f"checkpoints/{job_id}")
    for name in ("step-2", "step-4", ".staging-x1", "step-6"):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(b"half")
    with session_scope(settings.sqlalchemy_url) as session:
        publishing.record_checkpoint(
            session,
            claim=held,
            step=2,
            metrics={},
            storage_key=f"checkpoints/{job_id}/step-2",
            sha256="0" * 64,
        )
        session.get(Job, job_id).lease_expires_at = job_runs.utcnow() - timedelta(seconds=1)
    future = time.time() + 60  # written by an attempt that started after this sweep
    os.utime(folder / "step-6", (future, future))

    assert sweeper.sweep_once(settings) == [job_id]
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-6"]


@pytest.mark.slow
def test_a_database_outage_mid_run_leaves_the_job_to_the_sweep_instead_of_failing_it(
    settings, monkeypatch
):
    """A dropped connection is the infrastructure's fault, not the job's: no `failed`."""
    from sqlalchemy.exc import OperationalError

    from worker import run_job as run_job_module

    job_id = submit(settings)
    real_on_step = run_job_module.Progress.on_step

    def outage_at_step_two(self, report):
        if report.step == 2:
            raise OperationalError("UPDATE fine_tuning_job", {}, Exception("server closed"))
        real_on_step(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_step", outage_at_step_two)
    assert run_job_module.run_job(job_id, settings=settings) == "db_unavailable"
    assert status(settings, job_id) == "running"  # the lease lapses; the sweep takes over
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).lease_expires_at = job_runs.utcnow() - timedelta(seconds=1)
    assert sweep(settings) == [job_id]
    monkeypatch.setattr(run_job_module.Progress, "on_step", real_on_step)
    assert run_job_module.run_job(job_id, settings=settings) == "succeeded"


@pytest.mark.parametrize(("pending", "resent"), [(None, True), (0, True), (1, False), (3, False)])
def test_the_sweep_resends_a_waiting_job_only_when_its_message_may_be_lost(
    settings, monkeypatch, pending, resent
):
    """A job queued behind a long one is not lost; copies must not pile up faster than a
    busy worker skips them."""
    from app.jobs import queue
    from app.jobs import sweep as sweeper

    sent: list[str] = []
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, queue=None: sent.append(job_id))
    monkeypatch.setattr(queue, "pending_messages", lambda queues: pending)
    job_id = submit(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).enqueued_at = job_runs.utcnow() - timedelta(hours=1)
    sweeper.sweep_once(settings)
    assert sent == ([job_id] if resent else [])
