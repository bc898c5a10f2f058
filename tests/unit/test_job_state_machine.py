"""Issue 5, fault 6: the job repository as a state machine (hypothesis), SQLite and PostgreSQL.

Hypothesis drives random sequences of what the API, workers (current and stale) and the
sweep do to jobs; after every action the database must satisfy the lifecycle's rules:
only allowed transitions, terminal states absorb, one active attempt at most (the
fencing token only grows and stale attempts change nothing), and `succeeded` exactly
when one adapter with a sha256 is registered. A separate race test runs two completions
at the same moment from two threads: exactly one wins.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from app import tenancy
from app.config import Settings
from app.db.base import utcnow
from app.db.models import Adapter, Checkpoint, Job, Organization
from app.db.session import session_scope
from app.errors import InvalidState
from app.ids import new_id
from app.jobs import publishing
from app.jobs import runs as job_runs
from app.jobs import service as jobs

FULL = os.environ.get("LORAFORGE_CHAOS_FULL") == "1"
MAX_ATTEMPTS = 3
ALLOWED = {
    ("queued", "running"),  # a claim
    ("queued", "cancelled"),  # cancel before it starts
    ("running", "queued"),  # the sweep re-queues a run whose lease lapsed
    ("running", "succeeded"),
    ("running", "failed"),  # the run failed, or the sweep gave up after max attempts
    ("running", "cancelled"),  # the run saw the flag, or the sweep found it lapsed
}
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    from app import migrate

    url = None if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    migrate.upgrade(Settings(data_dir=tmp_path / "data", database_url=url))
    return url or f"sqlite:///{tmp_path / 'data' / 'loraforge.db'}"


def new_job(url: str, organization_id: str) -> str:
    with session_scope(url) as session:
        job = Job(
            id=new_id("ftjob"),
            organization_id=organization_id,
            model="tiny",
            training_file="file-x",
            hyperparameters={"n_epochs": 1},
            seed=1,
            status="queued",
            result_files=[],
            enqueued_at=utcnow(),
        )
        session.add(job)
        return job.id


def snapshot(url: str, job_id: str) -> tuple:
    with session_scope(url) as session:
        job = session.get_one(Job, job_id)
        return (job.status, job.attempt, job.cancel_requested, job.worker, job.fine_tuned_model)


class JobRepository(RuleBasedStateMachine):
    """Actions on the repository; `self.url` is set by the test that runs the machine."""

    url: str
    jobs = Bundle("jobs")
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        with session_scope(self.url) as session:
            org = tenancy.get_or_create_organization(session, name=new_id("org")[-12:].lower())
            self.org_id = org.id
        self.known: dict[str, str] = {}  # job id → the status last seen
        self.claims_made: dict[str, list[int]] = {}  # job id → attempts handed out
        self.lapsed: set[str] = set()  # running jobs whose lease we made lapse

    # -- the API ---------------------------------------------------------------------------
    @initialize(target=jobs)
    def first_job(self) -> str:
        return self.create()

    @rule(target=jobs)
    def create(self) -> str:
        job_id = new_job(self.url, self.org_id)
        self.known[job_id], self.claims_made[job_id] = "queued", []
        return job_id

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        before = snapshot(self.url, job_id)
        try:
            with session_scope(self.url) as session:
                org = session.get_one(Organization, self.org_id)
                status = jobs.cancel_job(session, organization=org, job_id=job_id).status
        except InvalidState:
            assert before[0] in {"succeeded", "failed"}
            assert snapshot(self.url, job_id) == before
            return
        assert status == ("cancelled" if before[0] in {"queued", "cancelled"} else "running")

    # -- workers, current and stale --------------------------------------------------------
    @rule(target=claims, job_id=jobs, worker=st.sampled_from(["w1", "w2"]))
    def claim(self, job_id: str, worker: str):
        status, attempt, cancel_requested, *_ = snapshot(self.url, job_id)
        lapsed = status == "running" and job_id in self.lapsed
        with session_scope(self.url) as session:
            claim = job_runs.claim_job(
                session,
                job_id=job_id,
                worker=worker,
                lease_seconds=600,
                max_attempts=MAX_ATTEMPTS,
            )
        # a running job's 600 s lease lapses only through `expire_lease` (a dead worker)
        claimable = (
            (status == "queued" or lapsed) and not cancel_requested and attempt < MAX_ATTEMPTS
        )
        if not claimable:
            assert claim is None and snapshot(self.url, job_id)[:3] == (
                status,
                attempt,
                cancel_requested,
            )
            return job_runs.Claim(job_id, -1)  # a claim that never owned anything
        assert claim is not None and claim.attempt == attempt + 1
        self.lapsed.discard(job_id)
        self.claims_made[job_id].append(claim.attempt)
        return claim

    @rule(claim=claims)
    def renew(self, claim: job_runs.Claim) -> None:
        self._owned_write(claim, lambda s: job_runs.renew_lease(s, claim=claim, lease_seconds=600))

    @rule(claim=claims, step=st.integers(1, 5))
    def checkpoint(self, claim: job_runs.Claim, step: int) -> None:
        def write(session):
            # what Progress.on_epoch does: renew (the fence), then record, one transaction
            job_runs.renew_lease(session, claim=claim, lease_seconds=600)
            publishing.record_checkpoint(
                session,
                claim=claim,
                step=step,
                metrics={"step": step},
                storage_key=f"checkpoints/{claim.job_id}/step-{step}",
                sha256="c" * 64,
            )

        self._owned_write(claim, write)

    @rule(claim=claims, step=st.integers(1, 5))
    def checkpoint_without_renewal(self, claim: job_runs.Claim, step: int) -> None:
        """record_checkpoint fences by itself: a stale writer's row must never land."""
        self._owned_write(
            claim,
            lambda s: publishing.record_checkpoint(
                s,
                claim=claim,
                step=step,
                metrics={"step": step},
                storage_key=f"checkpoints/{claim.job_id}/step-{step}",
                sha256="d" * 64,
            ),
        )

    @rule(claim=claims)
    def complete(self, claim: job_runs.Claim) -> None:
        sha = hashlib.sha256(f"{claim}".encode()).hexdigest()
        self._owned_write(
            claim,
            lambda s: publishing.complete_job(
                s,
                claim=claim,
                storage_key=f"adapters/{claim.job_id}",
                sha256=sha,
                size_bytes=1,
                trained_tokens=1,
            ),
        )

    @rule(claim=claims, status=st.sampled_from(["failed", "cancelled"]))
    def end(self, claim: job_runs.Claim, status: str) -> None:
        before = snapshot(self.url, claim.job_id)
        with session_scope(self.url) as session:
            ended = job_runs.end_run(session, claim=claim, status=status, error=None)
        owns = before[0] == "running" and before[1] == claim.attempt
        assert ended == owns
        if not owns:
            assert snapshot(self.url, claim.job_id) == before

    def _owned_write(self, claim: job_runs.Claim, write) -> None:
        before = snapshot(self.url, claim.job_id)
        status, attempt, cancel_requested, *_ = before
        try:
            with session_scope(self.url) as session:
                write(session)
        except job_runs.RunAborted as aborted:
            owns = status == "running" and attempt == claim.attempt
            assert aborted.reason == ("cancelled" if owns else "lease_lost")
            assert (owns and cancel_requested) or not owns
            assert snapshot(self.url, claim.job_id) == before  # nothing written, all rolled back
            return
        assert status == "running" and attempt == claim.attempt and not cancel_requested
        self.lapsed.discard(claim.job_id)  # renewed (or finished)

    # -- time and the sweep ----------------------------------------------------------------
    @rule(job_id=jobs)
    def expire_lease(self, job_id: str) -> None:
        """The worker died: its lease lapses (time travel instead of waiting)."""
        with session_scope(self.url) as session:
            job = session.get_one(Job, job_id)
            if job.status == "running":
                job.lease_expires_at = utcnow() - timedelta(seconds=1)
                self.lapsed.add(job_id)

    @rule(job_id=jobs)
    def worker_dies(self, job_id: str) -> None:
        """Its lease lapses and the next sweep finds it: the usual pair, as one action."""
        self.expire_lease(job_id)
        self.sweep()

    @rule()
    def sweep(self) -> None:
        lapsed = {job_id: snapshot(self.url, job_id) for job_id in self.lapsed}
        with session_scope(self.url) as session:
            requeued = job_runs.sweep(
                session, requeue_after_seconds=3600, max_attempts=MAX_ATTEMPTS
            )
        for job_id, (status, attempt, cancel_requested, *_) in lapsed.items():
            if status != "running":
                continue
            expected = (
                "cancelled"
                if cancel_requested
                else "failed"
                if attempt >= MAX_ATTEMPTS
                else "queued"
            )
            assert snapshot(self.url, job_id)[0] == expected
            assert (job_id in requeued) == (expected == "queued")
        self.lapsed.clear()

    # -- the rules -------------------------------------------------------------------------
    @invariant()
    def lifecycle_rules_hold(self) -> None:
        if not self.known:
            return
        with session_scope(self.url) as session:
            rows = session.scalars(select(Job).where(Job.id.in_(self.known))).all()
            adapters = dict(
                session.execute(
                    select(Adapter.job_id, func.count())
                    .where(Adapter.job_id.in_(self.known))
                    .group_by(Adapter.job_id)
                ).all()
            )
            shas = dict(
                session.execute(
                    select(Adapter.job_id, Adapter.sha256).where(Adapter.job_id.in_(self.known))
                ).all()
            )
            stray = session.scalar(
                select(func.count())
                .select_from(Checkpoint)
                .join(Job)
                .where(Job.id.in_(self.known), Job.attempt == 0)
            )
        assert stray == 0  # checkpoints come only from a run that held the job
        for job in rows:
            before = self.known[job.id]
            assert before == job.status or (before, job.status) in ALLOWED, (before, job.status)
            self.known[job.id] = job.status
            # the fencing token only grows, one per successful claim
            assert job.attempt == len(self.claims_made[job.id]) <= MAX_ATTEMPTS
            assert self.claims_made[job.id] == list(range(1, job.attempt + 1))
            succeeded = job.status == "succeeded"
            assert (adapters.get(job.id, 0) == 1) == succeeded and adapters.get(job.id, 0) <= 1
            if succeeded:
                assert len(shas[job.id]) == 64 and job.fine_tuned_model is not None
            if job.status == "queued":
                assert job.attempt < MAX_ATTEMPTS or job.cancel_requested is False


def run_machine(url: str) -> None:
    machine = type("Machine", (JobRepository,), {"url": url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=200 if FULL else 20,
            stateful_step_count=40 if FULL else 25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_the_job_repository_keeps_the_lifecycle_rules(database_url: str) -> None:
    run_machine(database_url)


def complete_in_threads(url: str, claims: list[job_runs.Claim]) -> list[str]:
    """Every claim completes the job at the same moment, each in its own transaction."""
    barrier = threading.Barrier(len(claims))
    outcomes: list[str] = [""] * len(claims)

    def complete(index: int, claim: job_runs.Claim) -> None:
        barrier.wait()
        try:
            with session_scope(url) as session:
                publishing.complete_job(
                    session,
                    claim=claim,
                    storage_key=f"adapters/{claim.job_id}",
                    sha256=f"{index:064d}",
                    size_bytes=1,
                    trained_tokens=1,
                )
            outcomes[index] = "won"
        except job_runs.RunAborted as aborted:
            outcomes[index] = aborted.reason

    threads = [threading.Thread(target=complete, args=pair) for pair in enumerate(claims)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_two_concurrent_completions_have_exactly_one_winner(database_url: str) -> None:
    with session_scope(database_url) as session:
        org_id = tenancy.get_or_create_organization(session, name="race").id
    for _ in range(200 if FULL else 20):
        job_id = new_job(database_url, org_id)
        with session_scope(database_url) as session:
            stale = job_runs.claim_job(
                session, job_id=job_id, worker="old", lease_seconds=600, max_attempts=3
            )
            session.get_one(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
        with session_scope(database_url) as session:
            current = job_runs.claim_job(
                session, job_id=job_id, worker="new", lease_seconds=600, max_attempts=3
            )
        # the same attempt twice (a retried completion) and the stale attempt, all at once
        outcomes = complete_in_threads(database_url, [current, current, stale])
        assert sorted(outcomes) == ["lease_lost", "lease_lost", "won"]
        assert outcomes[2] == "lease_lost"  # never the fenced-out attempt
        with session_scope(database_url) as session:
            [adapter] = session.scalars(select(Adapter).where(Adapter.job_id == job_id)).all()
            assert session.get_one(Job, job_id).status == "succeeded"
            assert adapter.sha256 == f"{outcomes.index('won'):064d}"
