"""One fine-tuning job, top to bottom: claim → load → train → publish → register.

The training itself is `worker.training.loop.train_lora`, a pure function; this
module wires it to the database (progress, lease, cancel) and the artifact store.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from app import job_runs
from app.config import Settings, get_settings
from app.db.models import File, Job
from app.db.session import session_scope
from app.job_runs import Claim, RunAborted
from app.jobs import add_event
from app.ml.adapters import ADAPTER_WEIGHTS, file_sha256
from app.storage import ArtifactStore

logger = logging.getLogger(__name__)
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class JobInputError(Exception):
    """The job cannot run as specified; it fails with this message, no retry."""

    def __init__(self, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


@dataclass
class JobInputs:
    base_model_ref: str
    training_path: Path
    validation_path: Path | None
    hyperparameters: dict
    seed: int


def run_job(job_id: str, *, settings: Settings | None = None) -> str:
    """Returns what happened: succeeded, failed, cancelled, lease_lost or skipped."""
    settings = settings or get_settings()
    store = ArtifactStore(settings.artifacts_dir)
    with session_scope(settings.sqlalchemy_url) as session:
        claim = job_runs.claim_job(
            session,
            job_id=job_id,
            worker=WORKER_NAME,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
    if claim is None:
        logger.info("job %s is not claimable (done, running elsewhere or cancelled)", job_id)
        return "skipped"
    try:
        _train_and_publish(claim, settings, store)
        return "succeeded"
    except RunAborted as aborted:
        if aborted.reason == "cancelled":
            _end(settings, claim, "cancelled")
        return aborted.reason
    except JobInputError as exc:
        _end(settings, claim, "failed", exc.error)
        return "failed"
    except Exception as exc:  # the task boundary: record the failure for the user, then stop
        logger.exception("job %s failed", job_id)
        message = f"training failed: {type(exc).__name__}: {exc}"
        _end(
            settings, claim, "failed", {"code": "training_error", "message": message, "param": None}
        )
        return "failed"


def _end(settings: Settings, claim: Claim, status: str, error: dict | None = None) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        job_runs.end_run(session, claim=claim, status=status, error=error)


def _train_and_publish(claim: Claim, settings: Settings, store: ArtifactStore) -> None:
    from app.ml.loading import load_base_model, load_tokenizer
    from worker.training.data import encode_dataset, read_jsonl
    from worker.training.loop import TrainConfig, count_steps, train_lora

    inputs = _read_inputs(claim, settings, store)
    tokenizer = load_tokenizer(inputs.base_model_ref)
    model = load_base_model(inputs.base_model_ref, device=settings.device)
    hp = inputs.hyperparameters
    config = TrainConfig(
        n_epochs=hp["n_epochs"],
        batch_size=hp["batch_size"],
        learning_rate=hp["learning_rate"],
        lora_r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        lora_target_modules=hp["lora_target_modules"],
        max_seq_length=hp["max_seq_length"],
        seed=inputs.seed,
        warmup_ratio=hp["warmup_ratio"],
        weight_decay=hp["weight_decay"],
        lr_scheduler=hp["lr_scheduler"],
    )
    train = encode_dataset(
        tokenizer, read_jsonl(inputs.training_path), max_seq_length=config.max_seq_length
    )
    valid = []
    if inputs.validation_path is not None:
        valid = encode_dataset(
            tokenizer, read_jsonl(inputs.validation_path), max_seq_length=config.max_seq_length
        )
    progress = Progress(claim, settings, store, total_steps=count_steps(len(train), config))
    progress.announce(examples=len(train), tokens=sum(len(example.input_ids) for example in train))
    with store.temp_dir() as out:
        result = train_lora(
            model=model,
            tokenizer=tokenizer,
            train_examples=train,
            valid_examples=valid,
            config=config,
            out_dir=out,
            on_step=progress.on_step,
            on_epoch=progress.on_epoch,
        )
        key = f"adapters/{claim.job_id}"
        published = store.publish_dir(out, key)
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            job_runs.complete_job(
                session,
                claim=claim,
                storage_key=key,
                sha256=result.sha256,
                size_bytes=(published / ADAPTER_WEIGHTS).stat().st_size,
                trained_tokens=result.trained_tokens,
            )
    except RunAborted:
        store.delete(key)  # cancelled (or taken over) at the last moment: publish nothing
        raise


def _read_inputs(claim: Claim, settings: Settings, store: ArtifactStore) -> JobInputs:
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get_one(Job, claim.job_id)
        ref = settings.base_models.get(job.model)
        if ref is None:
            raise JobInputError(
                f"base model {job.model!r} is no longer in this server's allowlist",
                code="model_not_available",
                param="model",
            )
        paths = {}
        for param, file_id in (
            ("training_file", job.training_file),
            ("validation_file", job.validation_file),
        ):
            if file_id is None:
                continue
            row = session.get(File, file_id)
            if row is None or row.organization_id != job.organization_id:
                raise JobInputError(
                    f"{param} {file_id} was deleted before training started",
                    code="file_not_found",
                    param=param,
                )
            paths[param] = store.path(row.storage_key)
        return JobInputs(
            ref, paths["training_file"], paths.get("validation_file"), job.hyperparameters, job.seed
        )


class Progress:
    """The training loop's callbacks: lease + cancel check every step, metrics, checkpoints."""

    def __init__(self, claim: Claim, settings: Settings, store: ArtifactStore, *, total_steps: int):
        self.claim, self.settings, self.store, self.total_steps = (
            claim,
            settings,
            store,
            total_steps,
        )

    def announce(self, *, examples: int, tokens: int) -> None:
        with session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.renew_lease(
                session, claim=self.claim, lease_seconds=self.settings.lease_seconds
            )
            add_event(
                session,
                job_id=self.claim.job_id,
                message=f"Training on {examples} examples ({tokens} tokens), "
                f"{self.total_steps} steps planned",
                data={"examples": examples, "tokens": tokens, "total_steps": self.total_steps},
            )

    def on_step(self, report) -> None:  # type: ignore[no-untyped-def]
        with session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.renew_lease(
                session, claim=self.claim, lease_seconds=self.settings.lease_seconds
            )
            if (
                report.step % self.settings.metrics_every_steps == 0
                or report.step == report.total_steps
            ):
                add_event(
                    session,
                    job_id=self.claim.job_id,
                    type="metrics",
                    message=f"Step {report.step}/{report.total_steps}: "
                    f"training loss={report.train_loss:.4f}",
                    data={
                        "step": report.step,
                        "total_steps": report.total_steps,
                        "epoch": report.epoch,
                        "train_loss": report.train_loss,
                        "learning_rate": report.learning_rate,
                        "trained_tokens": report.trained_tokens,
                    },
                )

    def on_epoch(self, report) -> None:  # type: ignore[no-untyped-def]
        key = f"checkpoints/{self.claim.job_id}/step-{report.step}"
        self.store.publish_dir(report.adapter_dir, key)
        metrics = {
            "step": report.step,
            "train_loss": report.train_loss,
            "valid_loss": report.valid_loss,
            "full_valid_loss": report.valid_loss,
        }
        with session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.renew_lease(
                session, claim=self.claim, lease_seconds=self.settings.lease_seconds
            )
            job_runs.record_checkpoint(
                session,
                claim=self.claim,
                step=report.step,
                metrics=metrics,
                storage_key=key,
                sha256=file_sha256(self.store.path(key) / ADAPTER_WEIGHTS),
            )
