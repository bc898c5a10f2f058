"""What a job needs before it trains, checked: its inputs read from the database and the
store, and the hyperparameters that only the loaded model can check.

Anything wrong here is the job's fault, not the worker's: `JobInputError` fails the job at
once with a code and the param at fault, and is never retried.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select

from app import base_models
from app.config import Settings
from app.db.models import Checkpoint, File, Job, Organization
from app.db.session import session_scope
from app.errors import CheckpointError, InvalidRequest, JobInputError, NotFound
from app.files.tool_format import uses_tools
from app.jobs import limits
from app.jobs.hyperparameters import unmatched_modules
from app.jobs.runs import Claim
from app.jobs.spec import RunSpec, SupervisedHyperparameters
from app.ml.adapters import ADAPTER_WEIGHTS
from app.model_config import context_of
from app.registry import service as registry
from app.statuses import CheckpointStatus
from app.storage import ArtifactCorrupt, ArtifactMissing, ArtifactStore, file_sha256
from worker.progress import Progress

TARGET_MODULES_PARAM = "hyperparameters.lora_target_modules"
SPECIAL_TOKENS_PARAM = "hyperparameters.train_special_tokens"


@dataclass
class JobInputs:
    spec: RunSpec
    organization_id: str
    base_model_ref: str
    training_path: Path
    validation_path: Path | None
    parent_adapter: Path | None  # a verified adapter to continue training
    checkpoints: list[tuple[str, str, int]]  # (key, manifest sha256, step), newest first
    store: ArtifactStore  # where the checkpoints are fetched from, on resume
    scratch: Path  # this host's copy of the inputs (under the job's scratch)


def trainable_tokens(
    tokenizer: Any, wanted: bool | list[str], progress: Progress
) -> tuple[int, ...]:
    """Token ids whose embedding rows train: the chat template's special tokens (true) or
    the listed ones, each of which must be one token of the base's vocabulary."""
    from app.ml.chat import template_token_ids
    from app.ml.special_tokens import token_ids_of

    if not wanted:
        return ()
    if wanted is True:
        ids = template_token_ids(tokenizer)
    else:
        ids, unknown = token_ids_of(tokenizer, wanted)
        if unknown:
            raise JobInputError(
                f"train_special_tokens {unknown} are not tokens of the base model's vocabulary",
                code="invalid_train_special_tokens",
                param=SPECIAL_TOKENS_PARAM,
            )
    names = tokenizer.convert_ids_to_tokens(ids)
    progress.event(
        f"Training the embeddings of {len(ids)} tokens: {', '.join(names)}",
        data={"train_special_tokens": names},
    )
    return tuple(ids)


def check_target_modules(model: Any, targets: Literal["all-linear"] | list[str]) -> None:
    """Fail the job, naming the param, when a target module is not in the model."""
    if targets == "all-linear":
        return
    missing = unmatched_modules(targets, (name for name, _ in model.named_modules()))
    if missing:
        raise JobInputError(
            f"lora_target_modules {missing} are not modules of the base model",
            code="invalid_lora_target_modules",
            param=TARGET_MODULES_PARAM,
        )


def check_examples(
    hp: SupervisedHyperparameters, n_train: int, n_valid: int, bounds: limits.WorkLimits
) -> None:
    """Fail the job when the examples its files encode to pass the bound (the API counted
    lines; a template that rewrites history trains one example per assistant turn; a DPO
    line is one pair of examples)."""
    per_item = hp.EXAMPLES_PER_ITEM
    with _failing_the_job():
        limits.check_examples(hp, n_train // per_item, n_valid // per_item, bounds)


def check_tool_calling(tokenizer: Any, records: list[dict[str, Any]], param: str) -> None:
    """Fail the job when its data calls functions but the base's chat template would drop
    the calls (never train on a render without them)."""
    from app.ml.tool_support import require_tool_calling

    if any(uses_tools(record) for record in records):
        with _failing_the_job():
            require_tool_calling(tokenizer, param=param)


def check_context(model: Any, max_seq_length: int, base_model: str) -> None:
    """Fail the job when max_seq_length passes the model's context (the API checks local
    models at creation; a hub model is known only now)."""
    with _failing_the_job():
        limits.check_context(max_seq_length, context_of(model.config.to_dict()), base_model)


def load_base(inputs: JobInputs, *, device: str) -> Any:
    """The frozen base at the job's quantization; a base that cannot be quantized (or a
    worker without bitsandbytes) fails the job naming `hyperparameters.quantization`."""
    from app.ml.loading import load_base_model

    quantization = inputs.spec.method.hyperparameters.quantization
    with _failing_the_job():
        return load_base_model(inputs.base_model_ref, device=device, quantization=quantization)


@contextmanager
def _failing_the_job() -> Iterator[None]:
    """A bound the API checks at creation, checked here on what only the worker knows: its
    refusal fails the job, with the same message, code and param."""
    try:
        yield
    except InvalidRequest as exc:
        raise JobInputError(exc.message, code=exc.code, param=exc.param) from exc


def resume_point(inputs: JobInputs, progress: Progress) -> Path | None:
    """The newest checkpoint whose files match their recorded sha256 (None: start over),
    fetched from the store into this host's scratch one at a time, newest first."""
    from worker.training.checkpoint import verify_checkpoint

    for key, manifest_sha256, step in inputs.checkpoints:
        try:
            folder = inputs.store.local_dir(key, inputs.scratch / f"resume-step-{step}")
            verify_checkpoint(folder, manifest_sha256=manifest_sha256)
        except (CheckpointError, ArtifactMissing, ArtifactCorrupt) as error:
            progress.event(f"Skipping checkpoint at step {step}: {error}", level="warn")
            continue
        progress.event(f"Resuming from the checkpoint at step {step}", data={"step": step})
        return folder
    return None


def read_inputs(claim: Claim, settings: Settings, store: ArtifactStore, scratch: Path) -> JobInputs:
    """The job's run spec and inputs, the stored ones copied into `scratch` on this host
    (the local backend hands out its own paths) once the database session is closed."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get_one(Job, claim.job_id)
        spec = RunSpec.of_job(job)
        ref = _base_model_ref(spec, settings)
        datasets = {}
        for param, file_id in (
            ("training_file", spec.training_file),
            ("validation_file", spec.validation_file),
        ):
            if file_id is None:
                continue
            row = session.get(File, file_id)
            if row is None or row.organization_id != job.organization_id:
                raise _deleted(param, file_id)
            datasets[param] = (file_id, row.storage_key)
        organization_id = job.organization_id
        parent = _parent_adapter(session, job)
        checkpoints = _checkpoints(session, job) if claim.attempt > 1 else []
    paths = {}
    for param, (file_id, key) in datasets.items():
        try:
            paths[param] = store.local_file(key, scratch)
        except ArtifactMissing:
            raise _deleted(param, file_id) from None
    return JobInputs(
        spec=spec,
        organization_id=organization_id,
        base_model_ref=ref,
        training_path=paths["training_file"],
        validation_path=paths.get("validation_file"),
        parent_adapter=_fetch_parent(parent, store, scratch),
        checkpoints=checkpoints,
        store=store,
        scratch=scratch,
    )


def _base_model_ref(spec: RunSpec, settings: Settings) -> str:
    ref = settings.base_models.get(spec.base_model)
    if ref is None:
        raise JobInputError(
            f"base model {spec.base_model!r} is no longer in this server's allowlist",
            code="model_not_available",
            param="model",
        )
    reason = base_models.problem(ref)
    if reason is not None:  # fail at once, naming why, instead of a hub lookup that retries
        raise JobInputError(
            base_models.explain(spec.base_model, ref, reason),
            code="model_not_available",
            param="model",
        )
    return ref


def _deleted(param: str, file_id: str) -> JobInputError:
    return JobInputError(
        f"{param} {file_id} was deleted before training started",
        code="file_not_found",
        param=param,
    )


def _parent_adapter(session: Any, job: Job) -> tuple[str, str, str] | None:
    """(model id, storage key, weights sha256) of the adapter or checkpoint a continued job
    starts from."""
    if job.parent_model is None:
        return None
    organization = session.get_one(Organization, job.organization_id)
    try:
        parent = registry.get_trained_model(
            session, organization=organization, model_id=job.parent_model
        )
    except NotFound:
        raise JobInputError(
            f"model {job.parent_model} was deleted (or pruned) before training started",
            code="model_not_found",
            param="model",
        ) from None
    return parent.stored.id, parent.stored.storage_key, parent.stored.sha256


def _fetch_parent(
    parent: tuple[str, str, str] | None, store: ArtifactStore, scratch: Path
) -> Path | None:
    """The parent adapter in this host's scratch, checked against its recorded sha256."""
    if parent is None:
        return None
    model_id, key, sha256 = parent
    try:
        folder = store.local_dir(key, scratch / "parent")
        intact = file_sha256(folder / ADAPTER_WEIGHTS) == sha256
    except (ArtifactMissing, ArtifactCorrupt, FileNotFoundError):
        intact = False
    if not intact:
        raise JobInputError(
            f"the stored files of {model_id} do not match their sha256",
            code="integrity_error",
            param="model",
        )
    return folder


def _checkpoints(session: Any, job: Job) -> list[tuple[str, str, int]]:
    rows = session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.job_id == job.id,
            Checkpoint.status == CheckpointStatus.ACTIVE,
            Checkpoint.state_sha256.is_not(None),
        )
        .order_by(Checkpoint.step_number.desc())
    )
    return [(r.storage_key, r.state_sha256, r.step_number) for r in rows]
