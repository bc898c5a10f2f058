"""Tables. Every tenant-owned row carries `organization_id`; queries scope by it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow
from app.ids import new_id
from app.statuses import AdapterStatus, CheckpointStatus, DeliveryStatus


class Organization(Base):
    __tablename__ = "organization"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the secret
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, for listing only
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class File(Base):
    __tablename__ = "file"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    examples: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "fine_tuning_job"
    __table_args__ = (Index("ix_fine_tuning_job_org_created", "organization_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    model: Mapped[str] = mapped_column(String(255))  # base-model name from the allowlist
    parent_model: Mapped[str | None] = mapped_column(String(255))  # ft: adapter continued from
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved, never "auto"
    method: Mapped[str] = mapped_column(String(16), default="supervised")  # RunSpec.method.type
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # Experiment trackers the worker logs to, as requested (RunSpec.integrations)
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)  # a JobStatus
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # Progress of the running attempt, written with its lease renewal (worker/progress.py).
    estimated_finish: Mapped[datetime | None]
    steps_completed: Mapped[int | None] = mapped_column(Integer)
    steps_planned: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Pause (docs/design.md 4.16): asked of a running job, it checkpoints at its next step;
    # `pauses` counts the attempts that ended so (they are not failures: max_attempts).
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    pauses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Early stopping (4.17): the step whose weights are the fine-tuned model.
    best_step: Mapped[int | None] = mapped_column(Integer)
    # Claim and lease: `attempt` is the fencing token every worker write is conditional on.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    __tablename__ = "job_event"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The id clients see and page by (migration 0005): random, so that it does not count
    # every tenant's events the way the global `seq` does. `seq` stays internal (order).
    public_id: Mapped[str] = mapped_column(
        String(40), unique=True, default=lambda: new_id("ftevent")
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id"), index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoint"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id"), index=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(255), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))  # of the adapter weights (serving)
    state_sha256: Mapped[str | None] = mapped_column(String(64))  # of manifest.json (resume)
    status: Mapped[str] = mapped_column(  # a CheckpointStatus
        String(16), default=CheckpointStatus.ACTIVE, server_default=CheckpointStatus.ACTIVE
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    """The registry: one row per published adapter."""

    __tablename__ = "adapter"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # ft:{base}:{org}:{suffix}:{job}
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id"), unique=True)
    storage_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(  # an AdapterStatus
        String(16), default=AdapterStatus.ACTIVE
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """A client's Idempotency-Key, scoped per organization and endpoint (migration 0003).

    A replay with the same request returns `object_id`'s current state; the hash of the
    request tells a replay from a reuse of the key for something else.
    """

    __tablename__ = "idempotency_key"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(32), primary_key=True)  # "files" | "jobs"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A receiver of an organization's events (migration 0007). The secret is kept: every
    delivery is signed with it (HMAC); the API shows it once, at creation."""

    __tablename__ = "webhook_endpoint"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(64))  # whsec_<base64>
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction that ended the job.

    `id` is the `webhook-id` of every attempt (receivers deduplicate by it); `payload` is the
    exact body signed and sent each time."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoint.id"), index=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # when a delivery message was last sent
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    """One try of a delivery: the receiver's status code, or why there was none."""

    __tablename__ = "webhook_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_delivery.id"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """A training (or webhook) worker process as it last reported itself: its queues and
    when it was last seen (a heartbeat; app/jobs/workers.py)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid
    queues: Mapped[list[str]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)
