"""Fine-tuning jobs, the API side: create, read, list, cancel, events, checkpoints.

The run protocol (claim, lease, completion, the sweep's recovery) is in `app/jobs/runs.py`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import quantization
from app.base_models import require_loadable
from app.db.base import utcnow
from app.db.models import Checkpoint, File, Job, JobEvent, Organization
from app.errors import InvalidRequest, InvalidState, NotFound, RateLimited
from app.files.preference_format import PREFERENCE, PREFERENCE_SHAPE
from app.files.service import get_file
from app.ids import new_id
from app.jobs import hyperparameters
from app.jobs.limits import WorkLimits, check_job_work
from app.jobs.spec import DpoHyperparameters, DpoMethod, RunSpec, SupervisedMethod
from app.registry import service as registry
from app.registry.service import TrainedModel
from app.schemas.jobs import JobCreate, MlflowIntegration
from app.statuses import ACTIVE_JOB_STATUSES, TERMINAL_JOB_STATUSES, CheckpointStatus, JobStatus
from app.webhooks.outbox import record_job_ended

EVENT_ID = re.compile(r"^ftevent-[A-Za-z0-9]{1,32}$")
Row = TypeVar("Row")


@dataclass
class Page(Generic[Row]):
    rows: list[Row]
    has_more: bool


def create_job(
    session: Session,
    *,
    organization: Organization,
    request: JobCreate,
    base_models: dict[str, str],
    limits: WorkLimits | None = None,
    mlflow_tracking_uris: Collection[str] = (),
) -> Job:
    """Validate the request against the allowlist and the caller's files; insert `queued`.

    `model` may be an `ft:` adapter or checkpoint (`…:ckpt-step-N`) of the caller's: the job
    continues training it (same base model and LoRA shape; `parent_model` records which).
    """
    _check_tracking_uris(request, allowed=mlflow_tracking_uris)
    base_model, parent = _base_and_parent(session, organization, request.model, base_models)
    training = _fine_tune_file(session, organization, request.training_file, "training_file")
    _check_file_fits_method(training, request, "training_file")
    validation = None
    if request.validation_file is not None:
        validation = _fine_tune_file(
            session, organization, request.validation_file, "validation_file"
        )
        _check_file_fits_method(validation, request, "validation_file")
    spec = _run_spec(request, base_model=base_model, parent=parent, training=training)
    resolved = spec.method.hyperparameters
    hyperparameters.check_evaluations(resolved, has_validation_file=validation is not None)
    quantization.require_backend(resolved.quantization)
    hyperparameters.check_target_modules(base_models[base_model], resolved.lora_target_modules)
    check_job_work(
        resolved,
        n_examples=training.examples,
        n_validation_examples=validation.examples if validation is not None else 0,
        base_model=base_model,
        model_ref=base_models[base_model],
        limits=limits or WorkLimits(),
    )
    hyperparameters.check_special_tokens(base_models[base_model], resolved.train_special_tokens)
    job = Job(
        id=new_id("ftjob"),
        organization_id=organization.id,
        **spec.job_columns(),
        suffix=request.suffix,
        metadata_=request.metadata,
        status=JobStatus.QUEUED,
        result_files=[],
        enqueued_at=utcnow(),  # the sweep re-sends if the message never arrives
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, message=f"Created fine-tuning job: {job.id}")
    return job


def _check_tracking_uris(request: JobCreate, *, allowed: Collection[str]) -> None:
    """An MLflow integration names a tracking URI only from the operator's list (why:
    app/schemas/jobs.py MlflowSettings)."""
    for index, integration in enumerate(request.integrations or ()):
        if isinstance(integration, MlflowIntegration):
            uri = integration.mlflow.tracking_uri
            if uri is not None and uri not in allowed:
                raise InvalidRequest(
                    f"tracking_uri {uri!r} is not one this server allows "
                    "(LORAFORGE_MLFLOW_TRACKING_URIS); leave it out to use the worker's "
                    "MLFLOW_TRACKING_URI",
                    param=f"integrations.{index}.mlflow.tracking_uri",
                )


def _run_spec(
    request: JobCreate, *, base_model: str, parent: TrainedModel | None, training: File
) -> RunSpec:
    """What the job will run: the request's hyperparameters resolved ("auto" from the
    training file), a continued adapter's LoRA shape kept."""
    seed = request.requested_seed()
    resolved = hyperparameters.resolve(
        request.requested_hyperparameters(),
        n_examples=training.examples,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        dataset_format=training.format,
    )
    if parent is not None:
        resolved = hyperparameters.continue_from(resolved, parent.lora_config)
    return RunSpec(
        base_model=base_model,
        parent_model=parent.stored.id if parent is not None else None,
        training_file=request.training_file,
        validation_file=request.validation_file,
        method=(
            DpoMethod(hyperparameters=resolved)
            if isinstance(resolved, DpoHyperparameters)
            else SupervisedMethod(hyperparameters=resolved)
        ),
        integrations=tuple(request.integrations or ()),
    )


def _check_file_fits_method(file: File, request: JobCreate, param: str) -> None:
    """Preference data trains DPO jobs only, and DPO jobs train on preference data only."""
    method = request.method_type()
    if (file.format == PREFERENCE) == (method == "dpo"):
        return
    if method == "dpo":
        why = f"is {file.format} data, and a DPO job needs preference data ({PREFERENCE_SHAPE})"
    else:
        why = "is preference data, which trains DPO jobs only: give method.type 'dpo'"
    raise InvalidRequest(f"file {file.id!r} {why}", param=param, code="invalid_file_format")


def _base_and_parent(
    session: Session, organization: Organization, model: str, base_models: dict[str, str]
) -> tuple[str, TrainedModel | None]:
    """The allowlisted base model to train, and the adapter or checkpoint to continue (for
    `ft:` ids)."""
    if model.startswith("ft:"):
        try:
            parent = registry.get_trained_model(session, organization=organization, model_id=model)
        except NotFound as exc:
            if exc.code == "checkpoint_pruned":
                raise InvalidRequest(exc.message, param="model", code=exc.code) from None
            raise InvalidRequest(
                f"model {model!r} does not exist", param="model", code="model_not_found"
            ) from None
        if parent.base_model in base_models:
            require_loadable(base_models, parent.base_model, error=InvalidRequest)
            return parent.base_model, parent
        model = parent.base_model
    if model not in base_models:
        allowed = (
            f"allowed: {', '.join(sorted(base_models))}"
            if base_models
            else "this server has none: set LORAFORGE_BASE_MODELS=name=path-or-hub-id,… "
            "where it runs"
        )
        raise InvalidRequest(
            f"model {model!r} is not an allowed base model ({allowed})",
            param="model",
            code="model_not_available",
        )
    require_loadable(base_models, model, error=InvalidRequest)
    return model, None


def _fine_tune_file(session: Session, organization: Organization, file_id: str, param: str) -> File:
    try:
        row = get_file(session, organization=organization, file_id=file_id, lock="share")
    except NotFound:
        raise InvalidRequest(
            f"file {file_id!r} does not exist", param=param, code="file_not_found"
        ) from None
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"file {file_id!r} is not a fine-tune file", param=param)
    return row


def get_job(session: Session, *, organization: Organization, job_id: str) -> Job:
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.organization_id == organization.id)
    )
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session, *, organization: Organization, after: str | None, limit: int
) -> Page[Job]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = select(Job).where(Job.organization_id == organization.id)
    if after is not None:
        cursor = get_job(session, organization=organization, job_id=after)
        query = query.where(
            (Job.created_at < cursor.created_at)
            | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
        )
    rows = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def cancel_job(session: Session, *, organization: Organization, job_id: str) -> Job:
    """A queued or paused job is cancelled at once; a running one is flagged and stops at its
    next step.

    Idempotent: cancelling a cancelled (or cancelling) job returns it unchanged.
    """
    job = get_job(session, organization=organization, job_id=job_id)
    if job.status == JobStatus.CANCELLED or (
        job.status == JobStatus.RUNNING and job.cancel_requested
    ):
        return job
    if job.status in TERMINAL_JOB_STATUSES:
        raise InvalidState(f"job {job_id} has already {job.status}; it cannot be cancelled")
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(cancel_requested=True)
    )
    cancelled_now = session.execute(  # type: ignore[attr-defined]  # DML returns a CursorResult
        update(Job)
        .where(Job.id == job.id, Job.status.in_((JobStatus.QUEUED, JobStatus.PAUSED)))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
    ).rowcount
    if cancelled_now:
        add_event(session, job_id=job.id, message="Fine-tuning job cancelled")
        record_job_ended(session, job_id=job.id, status=JobStatus.CANCELLED)
    else:
        add_event(
            session, job_id=job.id, message="Cancellation requested; stopping at the next step"
        )
    session.refresh(job)
    return job


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, message=message, level=level, type=type, data=data))
    session.flush()


def list_events(
    session: Session, *, organization: Organization, job_id: str, after: str | None, limit: int
) -> Page[JobEvent]:
    """Newest first, like OpenAI; `after` is the id of the last event of the previous page."""
    job = get_job(session, organization=organization, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.seq < event_seq(session, job.id, after, param="after"))
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def event_id(event: JobEvent) -> str:
    return event.public_id


def event_seq(session: Session, job_id: str, event_id_: str, *, param: str) -> int:
    """Where a page or a stream starts: the internal order of the job's event `event_id_`
    (never shown); `param` names where the client sent the id."""
    if not EVENT_ID.match(event_id_):
        raise InvalidRequest(
            f"{param} must be an event id like 'ftevent-…' from this job; got {event_id_[:80]!r}",
            param=param,
        )
    seq = session.scalar(
        select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.public_id == event_id_)
    )
    if seq is None:
        raise NotFound(f"No such event of job {job_id}: {event_id_}", param=param)
    return seq


def list_checkpoints(
    session: Session, *, organization: Organization, job_id: str, after: str | None, limit: int
) -> Page[Checkpoint]:
    job = get_job(session, organization=organization, job_id=job_id)
    query = select(Checkpoint).where(
        Checkpoint.job_id == job.id, Checkpoint.status == CheckpointStatus.ACTIVE
    )
    if after is not None:
        cursor = session.scalar(query.where(Checkpoint.id == after))
        if cursor is None:
            raise NotFound(f"No such checkpoint: {after}", param="after")
        query = query.where(Checkpoint.step_number < cursor.step_number)
    rows = list(session.scalars(query.order_by(Checkpoint.step_number.desc()).limit(limit + 1)))
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def check_active_quota(session: Session, *, organization: Organization, limit: int) -> None:
    """Refuse a new job (429) while the organization has `limit` queued, running or paused
    ones (a paused job holds its files and checkpoints; resuming it needs no room).

    Other organizations are not counted. Call it in the transaction that inserts the job:
    the organization's row is locked (SELECT … FOR UPDATE on PostgreSQL) until that
    transaction ends, so concurrent creates of one organization count and insert one at a
    time and the quota is exact. SQLite has no row locks (the clause is left out); there a
    writer's BEGIN IMMEDIATE (app/db/session.py) already serialises them.
    """
    if limit <= 0:
        return  # disabled
    session.execute(
        select(Organization.id).where(Organization.id == organization.id).with_for_update()
    )
    active = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.organization_id == organization.id, Job.status.in_(ACTIVE_JOB_STATUSES))
    ).scalar_one()
    if active >= limit:
        raise RateLimited(
            f"this organization already has {active} queued, running or paused jobs (the "
            f"limit is {limit}); wait for one to finish or cancel one",
            retry_after=60,
        )
