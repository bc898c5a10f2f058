"""Settings from the environment (`LORAFORGE_…`), with embedded defaults.

With nothing set everything runs on one machine and no services: SQLite (WAL) and
a Celery filesystem broker under the data dir, artifacts on local disk. Point
`LORAFORGE_DATABASE_URL` / `LORAFORGE_BROKER_URL` at PostgreSQL / Redis to scale out.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import platformdirs
from pydantic import AliasChoices, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.base_models import split_options


def default_data_dir() -> Path:
    """Per user, not per directory (`~/.local/share/loraforge`, or under $XDG_DATA_HOME), so
    every `loraforge` command finds the same database wherever it is started."""
    return platformdirs.user_data_path("loraforge")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFORGE_", extra="ignore")

    # Artifacts (datasets, checkpoints, adapters), the SQLite file and the filesystem broker.
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # None: SQLite in the data dir
    broker_url: str | None = None  # None: Celery's filesystem broker in the data dir
    # Where artifacts live: None (the data dir's artifacts/), file:///abs/path, or
    # s3://bucket/optional/prefix (endpoint and credentials the standard AWS way).
    storage_url: str | None = None
    # Bytes of adapter files an inference process keeps on local disk (object-store backend).
    adapter_cache_bytes: int = Field(default=10 << 30, ge=0)
    # "name=path-or-hub-id,…": the only base models a job or a request may name. An entry
    # may add ";quantization=nf4" (or int8) to serve that base quantized (app/base_models.py).
    base_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    _serving_quantization: dict[str, str] = PrivateAttr(default_factory=dict)
    max_upload_bytes: int = 100 * 1024 * 1024  # one uploaded file; 413 past it
    max_lines_per_file: int = 1_000_000  # examples per dataset file
    device: str = "auto"  # where training and inference run: cuda when available, else cpu
    # Devices one training job uses, data-parallel (worker/training/distributed.py): GPUs
    # cuda:0..N-1 with NCCL, or N CPU processes with gloo. A property of the worker's
    # hardware, not of the job: the adapter is the same for any N (docs/design.md 4.18).
    gpus_per_job: int = Field(default=1, ge=1)
    max_loaded_adapters: int = 8  # per base model, least recently used evicted first
    # Adapter ids ("ft:…,ft:…") loaded when the API starts and never evicted (pinned).
    preload_adapters: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_batch_size: int = 16  # sequences per base model in one forward pass
    # Of the memory free once a base model has loaded (CUDA: the device's; CPU: available
    # RAM), what its KV cache may hold; requests past it wait (app/inference/kv_budget.py).
    kv_cache_fraction: float = Field(default=0.5, gt=0, le=1)
    # of that budget, what one organization may hold while another has requests waiting or
    # running on the same base model (alone, it may use it all)
    kv_cache_org_share: float = Field(default=0.5, gt=0, le=1)
    inference_enabled: bool = True  # serve completions from this API process
    # How often an inference process re-reads the registry rows of the adapters it holds
    # (loaded, loading or waiting): one deleted or pruned elsewhere is dropped within this.
    registry_watch_seconds: float = Field(default=0.5, gt=0, le=1)
    # "base=queue,…": the Celery queue each base model's jobs go to (unlisted: `training`);
    # a worker consumes LORAFORGE_WORKER_QUEUES (`loraforge worker --queues` sets it).
    model_queues: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    worker_queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["training"])
    # A worker records itself this often (the `workers` table); one silent for three
    # intervals counts as gone, and jobs routed only to its queues wait, saying so.
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    # Prometheus (app/observability/metrics.py): per-adapter series for the N most used
    # adapters of a process, the rest as `other`; a worker's metrics port (0: none), on
    # loopback unless told otherwise (it has no authentication: bind it where only the
    # scraper reaches it).
    metrics_adapter_labels: int = Field(default=20, ge=0)
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    metrics_every_steps: int = 10  # a job's `metrics` event every N optimizer steps
    # "uri,uri": the MLflow tracking URIs a job's integration may name (none: only the
    # worker's MLFLOW_TRACKING_URI, by leaving tracking_uri out). See app/schemas/jobs.py.
    mlflow_tracking_uris: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A worker's lease on its job: a dead worker's job is re-queued about this long after.
    lease_seconds: int = 120
    sweep_interval_seconds: int = 30  # how often the API sweeps (app/jobs/sweep.py); 0: never
    requeue_after_seconds: int = 300  # re-send a queued job's wake-up message after this long
    max_attempts: int = 3  # attempts before a job whose worker keeps dying fails
    checkpoint_retention: int = 3  # newest checkpoints kept per job (0 keeps all)
    # The most memory a training job may plan to use on its device, in bytes (0: what the
    # device has free). The plan never counts on more than the device has free.
    training_memory_bytes: int = Field(default=0, ge=0)
    # Redis redelivers an unacked message after this long even while its worker still runs it;
    # harmless (the claim fences it). Tests lower it to force duplicate deliveries.
    broker_visibility_timeout: int = 6 * 3600
    # Security and limits. 0 disables a limit.
    # Guards /v1/admin, kept only as its sha256: LORAFORGE_ADMIN_KEY is hashed as it is
    # read (_hash_admin_key); without it, LORAFORGE_ADMIN_KEY_SHA256 gives the hash.
    admin_key_sha256: str | None = Field(
        default=None, validation_alias=AliasChoices("LORAFORGE_ADMIN_KEY", "admin_key")
    )
    # LORAFORGE_ADMIN_KEY_SHA256 (64 hex digits): what the process and its children keep
    # once LORAFORGE_ADMIN_KEY has been read (see get_settings).
    given_admin_key_sha256: str | None = Field(
        default=None,
        validation_alias="LORAFORGE_ADMIN_KEY_SHA256",
        pattern=r"^[0-9a-f]{64}$",
        exclude=True,
    )
    max_line_bytes: int = 1024 * 1024  # one JSONL example
    rate_limit_per_second: float = 100.0  # per organization, token bucket
    rate_limit_burst: int = 500
    max_active_jobs: int = 16  # queued + running per organization
    # Fair claims: running jobs per organization a worker may start (0: no cap).
    max_running_jobs_per_org: int = 0
    # A run that was cancelled or fenced off and has not stopped after this long is killed.
    stop_grace_seconds: float = 10.0
    # Bounds on one job's work (app/jobs/limits.py) and on an organization's stored files.
    max_tokens_per_step: int = 1 << 20  # batch_size * gradient_accumulation * max_seq_length
    # n_epochs * training examples + n_checkpoints * validation examples
    max_examples_per_job: int = 10_000_000
    max_stored_bytes_per_org: int = 10 << 30  # bytes of files; 413 past it
    # One tenant must not stall the others. 0 disables a limit.
    max_request_bytes: int = 2 * 1024 * 1024  # JSON bodies (uploads: max_upload_bytes)
    body_idle_timeout_seconds: float = 15.0  # longest wait for the next piece of a body
    body_min_bytes_per_second: float = 10_000.0  # a body's pace after the first idle timeout
    max_inference_requests_per_org: int = 32  # running + waiting, per API process
    inference_batch_share_per_org: float = 0.5  # of a batch's rows one organization may hold
    # OS niceness of the inference scheduler threads: control routes and admission run first
    inference_thread_nice: int = Field(default=10, ge=0, le=19)
    stream_key_check_seconds: float = 5.0  # a revoked key ends its open streams this fast
    # Webhook URLs resolving to loopback, link-local or private addresses are refused (SSRF)
    # unless this is set (a receiver on the same host or network; tests).
    webhook_allow_private: bool = False

    @field_validator("storage_url", mode="after")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if value.startswith("s3://") and len(value) > len("s3://"):
            return value
        if value.startswith("file:///"):
            return value
        raise ValueError(
            f"LORAFORGE_STORAGE_URL must be file:///abs/path or s3://bucket[/prefix]; got {value!r}"
        )

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()  # what every process prints and uses

    @field_validator("base_models", mode="before")
    @classmethod
    def _parse_base_models(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = [item.strip() for item in value.split(",") if item.strip()]
        parsed: dict[str, str] = {}
        for pair in pairs:
            name, sep, ref = pair.partition("=")
            if not sep or not name.strip() or not ref.strip():
                raise ValueError(f"LORAFORGE_BASE_MODELS entry {pair!r} is not name=path-or-hub-id")
            parsed[name.strip()] = ref.strip()
        return parsed

    @field_validator("model_queues", mode="before")
    @classmethod
    def _parse_model_queues(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        from app.jobs.routing import parse_model_queues

        return parse_model_queues(value)

    @field_validator("worker_queues", mode="before")
    @classmethod
    def _parse_worker_queues(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        from app.jobs.routing import parse_queue_names

        return parse_queue_names(value, setting="LORAFORGE_WORKER_QUEUES")

    @model_validator(mode="after")
    def _base_model_options(self) -> Settings:
        self.base_models, self._serving_quantization = split_options(self.base_models)
        return self

    @property
    def serving_quantization(self) -> dict[str, str]:
        """{base name: "nf4" | "int8"} for the bases served quantized (the rest: none)."""
        return self._serving_quantization

    @field_validator("preload_adapters", "mlflow_tracking_uris", mode="before")
    @classmethod
    def _parse_comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("admin_key_sha256", mode="after")
    @classmethod
    def _hash_admin_key(cls, value: str | None) -> str | None:
        # Keep only the hash in memory; requests are compared hash to hash in constant time.
        return hashlib.sha256(value.encode()).hexdigest() if value else None

    @model_validator(mode="after")
    def _admin_key_given_as_its_sha256(self) -> Settings:
        if self.admin_key_sha256 is None:
            self.admin_key_sha256 = self.given_admin_key_sha256
        return self

    @property
    def database_file(self) -> Path | None:
        """The embedded SQLite database's file (None when LORAFORGE_DATABASE_URL is set)."""
        return None if self.database_url else self.data_dir / "loraforge.db"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.database_file}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    _forget_admin_key(settings)
    return settings


def _forget_admin_key(settings: Settings) -> None:
    """Take the admin key's plaintext out of the process environment once it is read.

    Only its sha256 stays there (LORAFORGE_ADMIN_KEY_SHA256), for a later re-read and for
    the children `loraforge up` spawns, which inherit the environment.
    """
    if os.environ.pop("LORAFORGE_ADMIN_KEY", None) is not None and settings.admin_key_sha256:
        os.environ["LORAFORGE_ADMIN_KEY_SHA256"] = settings.admin_key_sha256
