"""The adapter registry: naming, registering, listing, resolving a model name, deleting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Adapter, Checkpoint, Job, Organization
from app.errors import InvalidState, NotFound, model_not_found
from app.statuses import TERMINAL_JOB_STATUSES, AdapterStatus, CheckpointStatus


@dataclass(frozen=True)
class StoredAdapter:
    """A fine-tuned model (an adapter or one of its checkpoints) and its stored weights."""

    id: str
    storage_key: str
    sha256: str


@dataclass(frozen=True)
class ModelTarget:
    """What an inference request runs: a base model, optionally with one adapter."""

    base_model: str
    adapter: StoredAdapter | None = None


def adapter_name(*, base_model: str, organization: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_model}:{organization}:{suffix or ''}:{job_id}"


def checkpoint_name(adapter: str, step: int) -> str:
    return f"{adapter}:ckpt-step-{step}"


def register_adapter(
    session: Session,
    *,
    adapter_id: str,
    organization_id: str,
    base_model: str,
    job_id: str,
    storage_key: str,
    sha256: str,
    size_bytes: int,
    lora_config: dict[str, Any],
) -> Adapter:
    adapter = Adapter(
        id=adapter_id,
        organization_id=organization_id,
        base_model=base_model,
        job_id=job_id,
        storage_key=storage_key,
        sha256=sha256,
        size_bytes=size_bytes,
        lora_config=lora_config,
        status=AdapterStatus.ACTIVE,
    )
    session.add(adapter)
    session.flush()
    return adapter


def list_adapters(session: Session, *, organization: Organization) -> list[Adapter]:
    query = select(Adapter).where(
        Adapter.organization_id == organization.id, Adapter.status == AdapterStatus.ACTIVE
    )
    return list(session.scalars(query.order_by(Adapter.created_at.desc())))


def get_adapter(
    session: Session, *, organization: Organization, model_id: str, for_update: bool = False
) -> Adapter:
    query = select(Adapter).where(
        Adapter.id == model_id,
        Adapter.organization_id == organization.id,
        Adapter.status == AdapterStatus.ACTIVE,
    )
    adapter = session.scalar(query.with_for_update() if for_update else query)
    if adapter is None:
        raise model_not_found(model_id)
    return adapter


def get_checkpoint(
    session: Session, *, organization: Organization, model_id: str, for_update: bool = False
) -> Checkpoint:
    """An active checkpoint; a pruned one is refused saying so (not "does not exist")."""
    query = select(Checkpoint).where(
        Checkpoint.fine_tuned_model_checkpoint == model_id,
        Checkpoint.organization_id == organization.id,
    )
    checkpoint = session.scalar(query.with_for_update() if for_update else query)
    if checkpoint is None:
        raise model_not_found(model_id)
    if checkpoint.status == CheckpointStatus.PRUNED:
        raise NotFound(
            f"The checkpoint '{model_id}' was pruned by retention: the server keeps only the "
            "newest checkpoints of each job (LORAFORGE_CHECKPOINT_RETENTION). "
            f"GET /v1/fine_tuning/jobs/{checkpoint.job_id}/checkpoints lists those kept",
            param="model",
            code="checkpoint_pruned",
        )
    return checkpoint


@dataclass(frozen=True)
class TrainedModel:
    """An adapter or a checkpoint as a new job continues it (docs/design.md 4.17)."""

    base_model: str
    stored: StoredAdapter
    lora_config: dict[str, Any]  # its LoRA shape is the continued job's


def get_trained_model(
    session: Session, *, organization: Organization, model_id: str
) -> TrainedModel:
    """An active adapter (`ft:…`) or checkpoint (`ft:…:ckpt-step-N`) of the organization;
    NotFound (model_not_found, or checkpoint_pruned) otherwise."""
    if ":ckpt-step-" in model_id:
        ckpt = get_checkpoint(session, organization=organization, model_id=model_id)
        job = session.get_one(Job, ckpt.job_id)  # its run's LoRA shape
        stored = StoredAdapter(model_id, ckpt.storage_key, ckpt.sha256)
        return TrainedModel(job.model, stored, job.hyperparameters)
    adapter = get_adapter(session, organization=organization, model_id=model_id)
    stored = StoredAdapter(adapter.id, adapter.storage_key, adapter.sha256)
    return TrainedModel(adapter.base_model, stored, adapter.lora_config)


def find_adapters(session: Session, *, model_ids: list[str]) -> list[Adapter]:
    """Active adapters with these ids, in any organization (server-side preloading only)."""
    query = select(Adapter).where(Adapter.id.in_(model_ids), Adapter.status == AdapterStatus.ACTIVE)
    return list(session.scalars(query))


def live_model_ids(session: Session, *, model_ids: list[str]) -> set[str]:
    """Those of `model_ids` (adapters and checkpoints, any organization) still active: what
    an inference replica may keep serving (app/inference/registry_watch.py)."""
    adapters = select(Adapter.id).where(
        Adapter.id.in_(model_ids), Adapter.status == AdapterStatus.ACTIVE
    )
    checkpoints = select(Checkpoint.fine_tuned_model_checkpoint).where(
        Checkpoint.fine_tuned_model_checkpoint.in_(model_ids),
        Checkpoint.status == CheckpointStatus.ACTIVE,
    )
    return set(session.scalars(adapters)) | set(session.scalars(checkpoints))


def resolve_model(
    session: Session, *, organization: Organization, model_id: str, base_models: dict[str, str]
) -> ModelTarget:
    """Map a request's `model` to a base model and, for ft: ids, the adapter files."""
    if model_id in base_models:
        return ModelTarget(base_model=model_id)
    model = get_trained_model(session, organization=organization, model_id=model_id)
    return ModelTarget(model.base_model, model.stored)


@dataclass(frozen=True)
class Removed:
    """What a model delete removed. The rows are gone once the caller commits; then it
    unloads `model_ids` from the inference engine and deletes `storage_keys`."""

    model_ids: list[str]  # the model and every checkpoint that was callable
    storage_keys: list[str]
    checkpoints: list[str]  # the checkpoint ids deleted with a model (none for a checkpoint)


def delete_model(session: Session, *, organization: Organization, model_id: str) -> Removed:
    """Delete an adapter with all its checkpoints, or one checkpoint (files: see Removed).

    Rows are locked first (PostgreSQL), so concurrent deletes of the model or of one of
    its checkpoints wait for each other and the later one finds nothing (404).
    """
    if ":ckpt-step-" in model_id:
        return _delete_checkpoint(session, organization=organization, model_id=model_id)
    adapter = get_adapter(session, organization=organization, model_id=model_id, for_update=True)
    adapter.status = AdapterStatus.DELETED
    rows = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == adapter.job_id)
            .order_by(Checkpoint.fine_tuned_model_checkpoint)
            .with_for_update()
        )
    )
    for row in rows:  # pruned ones too: nothing of the model is left to name
        session.delete(row)
    session.flush()
    active = [row for row in rows if row.status == CheckpointStatus.ACTIVE]
    names = [row.fine_tuned_model_checkpoint for row in active]
    return Removed(
        model_ids=[adapter.id, *names],
        storage_keys=[adapter.storage_key, *(row.storage_key for row in rows)],
        checkpoints=names,
    )


def _delete_checkpoint(session: Session, *, organization: Organization, model_id: str) -> Removed:
    checkpoint = get_checkpoint(
        session, organization=organization, model_id=model_id, for_update=True
    )
    status = session.scalar(select(Job.status).where(Job.id == checkpoint.job_id))
    if status not in TERMINAL_JOB_STATUSES:
        # its worker may resume from it or prune it at any moment
        raise InvalidState(
            f"'{model_id}' belongs to job {checkpoint.job_id}, which is {status}: its "
            "checkpoints can be deleted once it has ended (or cancel it first)",
            param="model",
        )
    session.delete(checkpoint)
    session.flush()
    return Removed(model_ids=[model_id], storage_keys=[checkpoint.storage_key], checkpoints=[])


def prune_checkpoints(
    session: Session, *, job_id: str, keep: int, keep_step: int | None = None
) -> list[Checkpoint]:
    """Mark all but the newest `keep` active checkpoints of a job pruned (0 keeps all);
    the one at `keep_step` (early stopping's best, the model it may serve) is kept too.

    Returns the pruned rows: the caller deletes their files after its transaction
    commits, so a rollback never leaves a row without its files. The rows stay (status
    `pruned`), so asking for one says it was pruned rather than that it never existed.
    """
    if keep <= 0:
        return []
    rows = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.status == CheckpointStatus.ACTIVE)
            .order_by(Checkpoint.step_number.desc())
        )
    )
    pruned = [row for row in rows[keep:] if row.step_number != keep_step]
    for row in pruned:
        row.status = CheckpointStatus.PRUNED
    session.flush()
    return pruned
