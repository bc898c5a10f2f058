"""The worker's resident process: woken by a message, it claims jobs and runs each in a child.

A message only wakes the worker; the database says what to run (DESIGN §1). This process
never trains and never imports torch: it claims the next job by the fair policy
(`job_runs.claim_next`: milliseconds, and no child at all when nothing is claimable, e.g.
for the message of a cancelled job), forks a fresh child per claimed job (a clean CUDA
context, all memory back when it exits), holds the job's lease while the child lives, and
kills the child `stop_grace_seconds` after its run was cancelled or fenced off if it has not
stopped by itself (it checks between micro-batches). Then it claims the next job, until none
is claimable: a job that a message's worker did not take (it took an older or fairer one)
is taken when a running job ends, or by the wake-up the sweep re-sends.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from app import job_runs
from app.config import Settings, get_settings
from app.db.session import get_engine, session_scope
from app.job_runs import Claim
from worker.run_job import WORKER_NAME, end, execute, remove_scratch

logger = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # the lease heartbeat and cancel check of a running child (at most)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
        )


def run_claimed(claim: Claim, settings: Settings) -> str:
    """Run a claimed job in a child process; its outcome, or why the child was stopped."""
    get_engine(settings.sqlalchemy_url).dispose()  # the child must not share our connections
    context = multiprocessing.get_context("fork")  # inherits the loaded code: starts at once
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main,
        args=(claim, settings, send, os.getpid()),
        name=f"loraforge-job-{claim.job_id}",
    )
    child.start()
    send.close()
    stopped_for = _supervise(child, claim, settings)
    outcome = _received(receive)
    if outcome is None and stopped_for == "cancelled":
        end(settings, claim, "cancelled")  # the child was killed: its compute has stopped
    elif outcome is None:
        logger.warning("the child of job %s died (exit %s)", claim.job_id, child.exitcode)
    remove_scratch(settings, claim.job_id)
    return outcome or stopped_for or "worker_lost"  # worker_lost: the sweep re-queues it


def _child_main(claim: Claim, settings: Settings, send: Connection, parent: int) -> None:
    _die_with(parent)
    send.send(execute(claim, settings))


def _die_with(parent: int) -> None:
    """Never outlive the supervisor: a killed worker must not leave a job computing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _supervise(child: BaseProcess, claim: Claim, settings: Settings) -> str | None:
    """Hold the lease until the child exits; kill it `stop_grace_seconds` after its run had
    to stop (cancelled or fenced off) if it is still running. Returns that reason."""
    reason, deadline = None, None
    while child.exitcode is None:
        state = _hold(claim, settings)
        if state is not None and deadline is None:
            reason, deadline = state, time.monotonic() + settings.stop_grace_seconds
        if deadline is not None and time.monotonic() >= deadline:
            logger.warning(
                "job %s: its process did not stop (%s); killing it", claim.job_id, reason
            )
            child.kill()
        child.join(min(POLL_SECONDS, settings.lease_seconds / 3))
    return reason


def _hold(claim: Claim, settings: Settings) -> str | None:
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            return job_runs.hold_lease(session, claim=claim, lease_seconds=settings.lease_seconds)
    except Exception:  # a database blip: the next poll retries; the lease has slack
        logger.warning("could not hold the lease of job %s", claim.job_id, exc_info=True)
        return None


def _received(receive: Connection) -> str | None:
    """What the child sent before it exited; None when it was killed or crashed first."""
    try:
        return receive.recv() if receive.poll() else None
    except EOFError:
        return None
    finally:
        receive.close()
