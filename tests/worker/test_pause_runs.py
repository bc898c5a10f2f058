"""The run protocol of a pause (app/jobs/runs.py, docs/design.md 4.16) on SQLite and
PostgreSQL, without training: how an attempt that checkpointed for a pause ends, and that
pause cycles neither get claimed nor use up the attempts a dead worker may cost."""

from __future__ import annotations

import pytest

from app.db.models import Job
from app.db.session import session_scope
from app.jobs import pause as pausing
from app.jobs import runs as job_runs
from app.jobs import service as jobs
from app.statuses import RunOutcome
from tests.factories import job_action, submit


def claim(settings, job_id: str) -> job_runs.Claim | None:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.claim_job(
            session, job_id=job_id, worker="w", lease_seconds=60, max_attempts=2
        )


def end_paused(settings, held: job_runs.Claim) -> RunOutcome:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.pause_run(session, claim=held)


def job(settings, job_id: str) -> Job:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.get_one(Job, job_id)


def test_pause_cycles_are_not_claimed_and_do_not_use_up_attempts(backend):
    job_id = submit(backend)
    for cycle in range(3):  # more cycles than max_attempts=2
        held = claim(backend, job_id)
        assert held is not None and held.attempt == cycle + 1
        job_action(backend, pausing.pause_job, job_id)
        assert end_paused(backend, held) == RunOutcome.PAUSED
        assert job(backend, job_id).status == "paused"
        assert claim(backend, job_id) is None  # a paused job is never claimed
        job_action(backend, pausing.resume_job, job_id)
    assert claim(backend, job_id) is not None  # attempt 4, only the 4th that was not a pause


@pytest.mark.parametrize(
    ("meanwhile", "outcome", "status"),
    [
        (pausing.resume_job, RunOutcome.PAUSED, "queued"),  # withdrawn while checkpointing
        (jobs.cancel_job, RunOutcome.CANCELLED, "cancelled"),
    ],
    ids=["withdrawn", "cancelled"],
)
def test_what_came_while_the_pause_checkpointed_wins(settings, meanwhile, outcome, status):
    job_id = submit(settings)
    held = claim(settings, job_id)
    job_action(settings, pausing.pause_job, job_id)
    job_action(settings, meanwhile, job_id)
    assert end_paused(settings, held) == outcome
    assert job(settings, job_id).status == status


def test_a_stale_attempt_cannot_pause_the_job(settings):
    job_id = submit(settings)
    stale = claim(settings, job_id)
    with session_scope(settings.sqlalchemy_url) as session:  # taken over by attempt 2
        session.get_one(Job, job_id).attempt = 2
    assert end_paused(settings, stale) == RunOutcome.LEASE_LOST
    assert job(settings, job_id).status == "running"
