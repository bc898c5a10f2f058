"""The worker's resident process: woken by a message, it claims jobs and runs each in a child.

A message only wakes the worker; the database says what to run (docs/design.md §4.1).
This process never trains and never imports torch: it claims the next job by the fair
policy (`job_runs.claim_next`: milliseconds, and no child at all when nothing is
claimable, e.g. for the message of a cancelled job), forks a fresh child per claimed job
(a clean CUDA context, all memory back when it exits), holds the job's lease while the
child lives, and kills the child `stop_grace_seconds` after its run was cancelled or
fenced off if it has not stopped by itself (it checks between micro-batches). Then it
claims the next job, until none is claimable: a job that a message's worker did not take
(it took an older or fairer one) is taken when a running job ends, or by the wake-up the
sweep re-sends.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from app.config import Settings, get_settings
from app.db.session import get_engine, session_scope
from app.jobs import runs as job_runs
from app.jobs import workers
from app.jobs.runs import Claim
from app.observability.metrics import RunWatch
from app.statuses import JobStatus, RunOutcome
from worker.lifeline import die_with
from worker.run_job import WORKER_NAME, end, execute, remove_scratch

logger = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # the lease heartbeat and cancel check of a running child (at most)


def wake(job_id: str, *, settings: Settings | None = None) -> list[str]:
    """Handle one wake-up message: run claimable jobs until there are none.

    Returns `"<job id>: <outcome>"` per job run; empty when the message found nothing to
    do (its job cancelled, finished, running elsewhere, or its organization at its cap).
    """
    settings = settings or get_settings()
    ran = []
    while (claim := _claim_next(settings)) is not None:
        ran.append(f"{claim.job_id}: {run_claimed(claim, settings)}")
    if not ran:
        logger.info("woken for job %s: nothing claimable", job_id)
    return ran


def _claim_next(settings: Settings) -> Claim | None:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.claim_next(
            session,
            worker=WORKER_NAME,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            max_running_per_org=settings.max_running_jobs_per_org,
            # only the jobs routed to the queues this worker consumes (docs/design.md §9.8)
            routed=workers.claimable_by(settings.worker_queues, settings.model_queues),
        )


def run_claimed(claim: Claim, settings: Settings) -> RunOutcome:
    """Run a claimed job in a child process; its outcome, or why the child was stopped."""
    watch = RunWatch(settings.sqlalchemy_url, claim.job_id)
    _observe(watch.claimed, claim.attempt)
    child = _Child.fork(claim, settings)
    stopped_for = _supervise(child, claim, settings, watch)
    outcome = child.outcome()
    if outcome is None and stopped_for == RunOutcome.CANCELLED:
        end(settings, claim, JobStatus.CANCELLED)  # the child was killed: its compute has stopped
    elif outcome is None:
        logger.warning("the child of job %s died (exit %s)", claim.job_id, child.exitcode)
    remove_scratch(settings, claim.job_id)
    outcome = outcome or stopped_for or RunOutcome.WORKER_LOST  # the sweep re-queues it
    watch.ended(outcome.value)
    return outcome


def _observe(read: Callable[..., None], *args: Any) -> None:
    """A metrics read that fails (a database blip) is logged; the run goes on."""
    try:
        read(*args)
    except Exception:
        logger.warning("could not read a job's metrics", exc_info=True)


class _Child:
    """A forked process running one job (`os.fork`: Celery's pool processes are daemonic,
    and multiprocessing refuses children to those). It inherits the loaded code, so it
    starts at once; it sends its outcome through a pipe and leaves with `os._exit`."""

    def __init__(self, pid: int, receive: Connection) -> None:
        self.pid, self.receive = pid, receive
        self.exitcode: int | None = None  # set once the child is reaped

    @classmethod
    def fork(cls, claim: Claim, settings: Settings) -> _Child:
        get_engine(settings.sqlalchemy_url).dispose()  # it must not share our connections
        receive, send = Pipe(duplex=False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                receive.close()
                die_with(parent)  # a killed worker must not leave a job computing
                send.send(execute(claim, settings))
                code = 0
            except BaseException:
                logger.exception("the process of job %s failed", claim.job_id)
            finally:
                os._exit(code)
        send.close()
        return cls(pid, receive)

    def wait(self, timeout: float) -> bool:
        """True once the child has exited (and is reaped), within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                pid, status = self.pid, 0
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                return False
            else:
                time.sleep(0.05)
        return True

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def outcome(self) -> RunOutcome | None:
        """What the child sent before it exited; None when it was killed or crashed first."""
        try:
            return self.receive.recv() if self.receive.poll() else None
        except EOFError:
            return None
        finally:
            self.receive.close()


def _supervise(
    child: _Child, claim: Claim, settings: Settings, watch: RunWatch
) -> RunOutcome | None:
    """Hold the lease until the child exits; kill it `stop_grace_seconds` after its run had
    to stop (cancelled or fenced off) if it is still running. Returns that reason."""
    reason, deadline = None, None
    poll = min(POLL_SECONDS, settings.lease_seconds / 3)
    while not child.wait(poll):
        state = _hold(claim, settings)
        _observe(watch.poll)
        if state is not None and deadline is None:
            reason, deadline = state, time.monotonic() + settings.stop_grace_seconds
        if deadline is not None and time.monotonic() >= deadline:
            logger.warning("job %s: its process did not stop (%s); kill it", claim.job_id, reason)
            child.kill()
    return reason


def _hold(claim: Claim, settings: Settings) -> RunOutcome | None:
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            return job_runs.hold_lease(session, claim=claim, lease_seconds=settings.lease_seconds)
    except Exception:  # a database blip: the next poll retries; the lease has slack
        logger.warning("could not hold the lease of job %s", claim.job_id, exc_info=True)
        return None
