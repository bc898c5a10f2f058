"""What an attempt publishes: its checkpoints, and at the end the adapter with the job's
success, each in the caller's transaction and fenced like every worker write (the run
protocol: app/jobs/runs.py, docs/design.md §4.3, §4.7)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Checkpoint, Job, Organization
from app.errors import RunAborted
from app.ids import new_id
from app.jobs.runs import Claim, owned
from app.jobs.service import add_event
from app.registry import service as registry
from app.statuses import CheckpointStatus, JobStatus, RunOutcome
from app.webhooks.outbox import record_job_ended


def record_checkpoint(
    session: Session,
    *,
    claim: Claim,
    step: int,
    metrics: dict[str, Any],
    storage_key: str,
    sha256: str,
    state_sha256: str | None = None,
    keep: int = 0,
    keep_step: int | None = None,
) -> list[str]:
    """Record a checkpoint, then prune all but the job's newest `keep` (0 keeps all) and
    `keep_step` (early stopping's best); one event says both. Returns the pruned storage
    keys: delete them after the commit."""
    # Fenced like every worker write: a stale attempt (or a cancelled run) records nothing.
    # The row lock keeps a takeover from slipping in before the insert (PostgreSQL).
    cancel_requested = session.scalar(
        select(Job.cancel_requested).where(*owned(claim)).with_for_update()
    )
    if cancel_requested is None or cancel_requested:
        raise RunAborted(RunOutcome.CANCELLED if cancel_requested else RunOutcome.LEASE_LOST)
    job = session.get_one(Job, claim.job_id)
    name = registry.checkpoint_name(fine_tuned_model_name(session, job), step)
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.fine_tuned_model_checkpoint == name)
    )
    if checkpoint is None:  # a resumed attempt may write the same step again
        checkpoint = Checkpoint(
            id=new_id("ftckpt"),
            job_id=job.id,
            organization_id=job.organization_id,
            step_number=step,
            fine_tuned_model_checkpoint=name,
        )
        session.add(checkpoint)
    checkpoint.metrics, checkpoint.storage_key, checkpoint.sha256 = metrics, storage_key, sha256
    checkpoint.state_sha256 = state_sha256  # manifest of the resume state (worker/training)
    checkpoint.status = CheckpointStatus.ACTIVE  # a restarted attempt may write a pruned step again
    session.flush()
    pruned = registry.prune_checkpoints(session, job_id=job.id, keep=keep, keep_step=keep_step)
    message = f"Checkpoint created at step {step}"
    data: dict[str, Any] = {"step": step}
    if pruned:
        steps = sorted(row.step_number for row in pruned)
        listed = f"step{'s' * (len(steps) > 1)} {', '.join(map(str, steps))}"
        message += (
            f"; pruned by retention: {listed} (a job keeps its newest {keep} checkpoints, "
            "LORAFORGE_CHECKPOINT_RETENTION)"
        )
        data |= {"pruned_steps": steps, "checkpoint_retention": keep}
    add_event(session, job_id=job.id, message=message, data=data)
    return [row.storage_key for row in pruned]


def fine_tuned_model_name(session: Session, job: Job) -> str:
    org = session.get_one(Organization, job.organization_id)
    return registry.adapter_name(
        base_model=job.model, organization=org.name, suffix=job.suffix, job_id=job.id
    )


def complete_job(
    session: Session,
    *,
    claim: Claim,
    storage_key: str,
    sha256: str,
    size_bytes: int,
    trained_tokens: int,
    result_files: list[str] | None = None,
    applied: dict[str, Any] | None = None,
    best_step: int | None = None,
) -> str:
    """Register the adapter and mark the job succeeded in the caller's one transaction.

    `applied`: settings the worker decided at run time (e.g. `packing`, off where the model
    does not isolate packed examples); they override the job's values in the adapter's
    recorded `lora_config`, so the registry says how the adapter was really trained.
    `best_step`: early stopping served that step's checkpoint (docs/design.md 4.17).
    """
    job = session.get_one(Job, claim.job_id)
    name = fine_tuned_model_name(session, job)
    done = session.execute(  # type: ignore[attr-defined]  # DML returns a CursorResult
        update(Job)
        .where(*owned(claim), Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.SUCCEEDED,
            fine_tuned_model=name,
            trained_tokens=trained_tokens,
            result_files=result_files or [],
            finished_at=utcnow(),
            lease_expires_at=None,
            pause_requested=False,  # asked during the last step: nothing is left to pause
            best_step=best_step,
        )
    ).rowcount
    if done != 1:
        still_ours = session.scalar(select(Job.id).where(*owned(claim)))
        raise RunAborted(RunOutcome.CANCELLED if still_ours else RunOutcome.LEASE_LOST)
    registry.register_adapter(
        session,
        adapter_id=name,
        organization_id=job.organization_id,
        base_model=job.model,
        job_id=job.id,
        storage_key=storage_key,
        sha256=sha256,
        size_bytes=size_bytes,
        lora_config={**job.hyperparameters, **(applied or {})},
    )
    add_event(session, job_id=job.id, message=f"New fine-tuned model created: {name}")
    add_event(session, job_id=job.id, message="The job has successfully completed")
    record_job_ended(session, job_id=job.id, status=JobStatus.SUCCEEDED)
    return name
