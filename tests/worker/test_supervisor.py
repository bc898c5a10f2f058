"""The worker's resident process (worker/supervisor.py) against a real database: a message
is a wake-up, jobs are claimed by the fair policy, each runs in a child that is stopped
when its run is cancelled (issue 14, findings 2, 3 and 6). Training is stubbed here
(tests/worker/test_run_job.py trains for real), so each test takes a few seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app import tenancy
from app.config import get_settings
from app.db.models import Job
from app.db.session import session_scope
from app.jobs import runs as job_runs
from app.jobs import service as jobs
from tests.conftest import make_settings
from tests.factories import submit
from worker import run_job as run_job_module
from worker import supervisor


def quick_failure(*_args) -> None:
    """Training stand-in: ends the run (failed) at once, so its organization runs 0 jobs."""
    raise run_job_module.JobInputError("stand-in", code="stand_in")


def cancel(settings, job_id: str, org: str = "acme") -> str:
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name=org)
        return jobs.cancel_job(session, organization=organization, job_id=job_id).status


def rows(settings, *ids: str) -> dict[str, Job]:
    with session_scope(settings.sqlalchemy_url) as session:
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}


@pytest.fixture
def deliver(backend, monkeypatch):
    """The Celery task as a worker runs it, for one message (without a broker)."""
    env = {
        "LORAFORGE_DATA_DIR": str(backend.data_dir),
        "LORAFORGE_BASE_MODELS": ",".join(f"{k}={v}" for k, v in backend.base_models.items()),
        "LORAFORGE_DEVICE": "cpu",
    }
    if backend.database_url:
        env["LORAFORGE_DATABASE_URL"] = backend.database_url
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    from worker.tasks import train

    yield train
    get_settings.cache_clear()


def test_an_organizations_job_starts_before_anothers_backlog_drains(backend, deliver, monkeypatch):
    """One worker; A submits 4 jobs, then B one. Messages arrive in that order, but B's
    job starts second: a message only wakes the worker, which picks fairly."""
    monkeypatch.setattr(run_job_module, "_train_and_publish", quick_failure)
    backlog = [submit(backend, org="a") for _ in range(4)]
    [late] = [submit(backend, org="b")]
    for job_id in [*backlog, late]:
        deliver(job_id)
    jobs_ = rows(backend, *backlog, late)
    started = sorted(jobs_, key=lambda job_id: jobs_[job_id].started_at)
    assert started == [backlog[0], late, *backlog[1:]]
    assert {job.status for job in jobs_.values()} == {"failed"}  # all ran, none stranded
    assert {job.attempt for job in jobs_.values()} == {1}  # none claimed twice


def test_messages_for_cancelled_jobs_start_no_process(backend, monkeypatch):
    """A stale message costs a read: no child process is forked for it."""
    monkeypatch.setattr(run_job_module, "_train_and_publish", quick_failure)
    forks, real_fork = [], os.fork

    def counting_fork() -> int:
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", counting_fork)
    cancelled = [submit(backend, org="attacker") for _ in range(20)]
    assert {cancel(backend, job_id, "attacker") for job_id in cancelled} == {"cancelled"}
    assert [supervisor.wake(job_id, settings=backend) for job_id in cancelled] == [[]] * 20
    assert forks == []
    victim = submit(backend, org="victim")
    assert supervisor.wake(victim, settings=backend) == [f"{victim}: failed"]
    assert len(forks) == 1


def test_a_child_that_ignores_a_cancel_is_killed_and_counts_as_active_until_then(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The child cancels its own job, then computes on, deaf to it (as one giant step did):
    the supervisor keeps the job `running` (active for the quota; the sweep cannot end it
    while it computes) and kills the child after the grace period."""
    from app import migrate

    settings = make_settings(
        tmp_path / "data", tiny_model_dir, lease_seconds=3, stop_grace_seconds=6.0
    )
    migrate.upgrade(settings)
    job_id = submit(settings)
    seen = tmp_path / "seen"

    def deaf(claim, settings, _store, _progress) -> None:
        assert cancel(settings, claim.job_id) == "running"  # stops "at the next check"
        time.sleep(4)  # longer than the lease: only the supervisor can have renewed it
        with session_scope(settings.sqlalchemy_url) as session:
            job_runs.sweep(session, requeue_after_seconds=3600, max_attempts=3)
        with session_scope(settings.sqlalchemy_url) as session:
            status = session.get_one(Job, claim.job_id).status
        seen.write_text(f"{os.getpid()} {status}")
        while True:  # never checks again
            time.sleep(0.05)

    monkeypatch.setattr(run_job_module, "_train_and_publish", deaf)
    assert supervisor.wake(job_id, settings=settings) == [f"{job_id}: cancelled"]
    pid, status_while_computing = seen.read_text().split()
    assert status_while_computing == "running"
    assert not Path(f"/proc/{pid}").exists()  # killed, and reaped
    assert rows(settings, job_id)[job_id].status == "cancelled"


def claim_next(settings, cap: int = 0, worker: str = "w") -> job_runs.Claim | None:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.claim_next(
            session, worker=worker, lease_seconds=60, max_attempts=3, max_running_per_org=cap
        )


def test_an_organization_at_its_running_cap_waits_and_is_taken_when_one_ends(backend):
    first, second = submit(backend, org="a"), submit(backend, org="a")
    other = submit(backend, org="b")
    running = claim_next(backend, cap=1)
    assert running.job_id == first
    assert claim_next(backend, cap=1).job_id == other  # a is at its cap
    assert claim_next(backend, cap=1) is None  # a's second waits, though it is queued
    with session_scope(backend.sqlalchemy_url) as session:
        job_runs.end_run(session, claim=running, status="failed")
    assert claim_next(backend, cap=1).job_id == second


def test_concurrent_claims_take_each_job_once_and_keep_the_cap(backend):
    from concurrent.futures import ThreadPoolExecutor

    backlog = [submit(backend, org="a") for _ in range(3)]
    others = [submit(backend, org="b") for _ in range(3)]
    with ThreadPoolExecutor(8) as pool:
        claims = [c for c in pool.map(lambda i: claim_next(backend, 2, f"w{i}"), range(8)) if c]
    taken = [claim.job_id for claim in claims]
    assert len(taken) == len(set(taken)) == 4  # two per organization: the cap held
    assert set(taken) == {*backlog[:2], *others[:2]}  # the oldest of each
    assert {job.attempt for job in rows(backend, *taken).values()} == {1}


def test_the_supervisors_heartbeat_keeps_a_cancelled_run_active_until_it_stops(backend):
    from datetime import timedelta

    job_id = submit(backend)
    held = claim_next(backend)
    with session_scope(backend.sqlalchemy_url) as session:
        assert job_runs.hold_lease(session, claim=held, lease_seconds=60) is None
    assert cancel(backend, job_id) == "running"
    with session_scope(backend.sqlalchemy_url) as session:  # its lease had lapsed
        session.get_one(Job, job_id).lease_expires_at = job_runs.utcnow() - timedelta(seconds=1)
    with session_scope(backend.sqlalchemy_url) as session:
        assert job_runs.hold_lease(session, claim=held, lease_seconds=60) == "cancelled"
    with session_scope(backend.sqlalchemy_url) as session:
        assert job_runs.sweep(session, requeue_after_seconds=3600, max_attempts=3) == []
        assert session.get_one(Job, job_id).status == "running"  # still computing: active
        with pytest.raises(job_runs.RunAborted, match="cancelled"):
            job_runs.check_run(session, claim=held)  # the child's check stops it
    stale = job_runs.Claim(job_id, held.attempt - 1)
    with session_scope(backend.sqlalchemy_url) as session:
        assert job_runs.hold_lease(session, claim=stale, lease_seconds=60) == "lease_lost"
