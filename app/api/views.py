"""Rows → response models (the only place that knows both shapes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, overload

from app.db.models import Adapter, ApiKey, Checkpoint, File, Job, JobEvent
from app.jobs import service as jobs
from app.schemas.files import FileRead
from app.schemas.jobs import CheckpointRead, EventRead, JobError, JobRead
from app.schemas.models import ModelRead
from app.statuses import JobStatus


@overload
def epoch(moment: datetime) -> int: ...
@overload
def epoch(moment: datetime | None) -> int | None: ...


def epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_view(row: File) -> FileRead:
    return FileRead(
        id=row.id,
        bytes=row.bytes,
        created_at=epoch(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
    )


def job_view(job: Job) -> JobRead:
    return JobRead(
        id=job.id,
        model=job.model,
        created_at=epoch(job.created_at),
        finished_at=epoch(job.finished_at),
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.organization_id,
        result_files=job.result_files or [],
        status=job.status,
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=job.hyperparameters,
        method={"type": job.method, job.method: {"hyperparameters": job.hyperparameters}},
        trained_tokens=job.trained_tokens,
        # OpenAI: null unless the job is running (a re-queued attempt's estimate is stale)
        estimated_finish=epoch(job.estimated_finish) if job.status == JobStatus.RUNNING else None,
        steps_completed=job.steps_completed,
        steps_planned=job.steps_planned,
        best_step=job.best_step,
        error=JobError(**job.error) if job.error else None,
        seed=job.seed,
        suffix=job.suffix,
        metadata=job.metadata_,
        integrations=job.integrations or [],
    )


def event_view(event: JobEvent) -> EventRead:
    return EventRead(
        id=jobs.event_id(event),
        created_at=epoch(event.created_at),
        level=event.level,
        message=event.message,
        type=event.type,
        data=event.data,
    )


def checkpoint_view(row: Checkpoint) -> CheckpointRead:
    return CheckpointRead(
        id=row.id,
        created_at=epoch(row.created_at),
        fine_tuning_job_id=row.job_id,
        fine_tuned_model_checkpoint=row.fine_tuned_model_checkpoint,
        step_number=row.step_number,
        metrics=row.metrics,
    )


def base_model_view(name: str) -> ModelRead:
    return ModelRead(id=name, created=0, owned_by="system", kind="base")


def adapter_view(row: Adapter, owner: str) -> ModelRead:
    return ModelRead(
        id=row.id,
        created=epoch(row.created_at),
        owned_by=owner,
        kind="adapter",
        base_model=row.base_model,
        job_id=row.job_id,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        lora_config=row.lora_config,
    )


def checkpoint_model_view(row: Checkpoint, owner: str, base_model: str) -> ModelRead:
    return ModelRead(
        id=row.fine_tuned_model_checkpoint,
        created=epoch(row.created_at),
        owned_by=owner,
        kind="checkpoint",
        base_model=base_model,
        job_id=row.job_id,
        sha256=row.sha256,
    )


def api_key_view(key: ApiKey, organization: str) -> dict[str, Any]:
    """The listable fields of a key: never its hash, never its secret."""
    return {
        "id": key.id,
        "organization": organization,
        "prefix": key.prefix,
        "created_at": epoch(key.created_at),
        "revoked_at": epoch(key.revoked_at),
    }
