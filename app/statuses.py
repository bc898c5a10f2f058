"""The lifecycle values of jobs, checkpoints and adapters, and how a run of a job ends.

Their own module, importing nothing: the API, the worker, the sweep and the CLI all name
them, and none of those should have to load the database layer (or torch) to do so. The
values are what the HTTP API sends and the database stores (plain strings there, no
migration): a `StrEnum` member compares equal to its string, so rows read back as `str`
compare with them as they are.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A fine-tuning job's `status` (OpenAI's names)."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # checkpointed and released, or held before it ran; resume re-queues
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Terminal statuses absorb: no attempt ever writes to such a job again.
TERMINAL_JOB_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# A job still waiting, computing or paused: it counts against the organization's active-job
# cap and still reads its files. A paused job holds no compute, but its files and checkpoints,
# and resuming it must never find the cap full (docs/design.md 4.16).
ACTIVE_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED})


class CheckpointStatus(StrEnum):
    """A checkpoint row's `status`: a pruned one's files are gone; the row says why."""

    ACTIVE = "active"
    PRUNED = "pruned"  # by LORAFORGE_CHECKPOINT_RETENTION


class AdapterStatus(StrEnum):
    """A registered adapter's `status`; a deleted one is never served or listed."""

    ACTIVE = "active"
    DELETED = "deleted"


class DeliveryStatus(StrEnum):
    """A webhook delivery (one event to one endpoint, the outbox row): docs/design.md 4.12."""

    PENDING = "pending"  # due at next_attempt_at (retries with backoff)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # every attempt of the schedule failed


class RunOutcome(StrEnum):
    """How one run (attempt) of a job ended: what the worker's run returns and logs.

    Not a job status: a run that lost its lease or its database leaves the job as it is
    (another attempt or the sweep takes it on). The first four equal the job statuses
    the run wrote.
    """

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # checkpointed and released at a pause request (or re-queued)
    LEASE_LOST = "lease_lost"  # another attempt took the job over (fenced off)
    DB_UNAVAILABLE = "db_unavailable"  # the database went away; the sweep re-queues
    WORKER_LOST = "worker_lost"  # the run's process died; the sweep re-queues
    SKIPPED = "skipped"  # nothing to claim: done, running elsewhere or cancelled


# The outcomes after which the job itself has ended (its scratch can go).
JOB_ENDING_OUTCOMES = frozenset({RunOutcome.SUCCEEDED, RunOutcome.FAILED, RunOutcome.CANCELLED})
