"""One fine-tuning job, top to bottom: claim → load → train → publish → register.

The training itself is `worker.training.loop.train_lora`, a pure function; this
module wires it to the database (progress, lease, cancel: worker/progress.py) and the
artifact store. A job claimed again after its worker died (attempt > 1) resumes from
its newest checkpoint whose files match the sha256 recorded in the database.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy.exc import OperationalError

from app.config import Settings, get_settings
from app.db.session import session_scope
from app.errors import JobInputError, RunAborted, public_message
from app.files import service as files
from app.files.preference_format import conversations
from app.jobs import publishing
from app.jobs import runs as job_runs
from app.jobs.leftovers import remove_dead_attempts_leftovers, remove_scratch_of_ended_jobs
from app.jobs.limits import WorkLimits
from app.jobs.runs import Claim
from app.jobs.spec import DpoHyperparameters, RunSpec, SupervisedHyperparameters
from app.ml.adapters import ADAPTER_WEIGHTS
from app.statuses import JOB_ENDING_OUTCOMES, JobStatus, RunOutcome
from app.storage import ArtifactStore, open_store
from worker import job_inputs, job_memory
from worker.best_checkpoint import use_best_checkpoint
from worker.heap import fix_mmap_threshold
from worker.job_inputs import JobInputs
from worker.progress import Progress, metrics_csv
from worker.training.data import Example, encode_dataset, read_jsonl  # torch-free
from worker.training.distributed import RankLost  # torch-free too
from worker.training.packing import count_steps  # torch-free too
from worker.training.preference_data import encode_preferences  # torch-free

logger = logging.getLogger(__name__)
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str, *, settings: Settings | None = None) -> RunOutcome:
    """Claim `job_id` and run it in this process: succeeded, failed, cancelled, lease_lost,
    db_unavailable or skipped. The worker itself claims by the fair policy and runs each
    job in a child it supervises (worker/supervisor.py); this is the in-process path.

    All scratch of the attempt lives in `tmp/<job_id>/` of the store; once the job is
    terminal, that folder goes (what a killed attempt left there included).
    """
    settings = settings or get_settings()
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
        return RunOutcome.SKIPPED
    # Steps renew the lease; this covers the phases without steps (loading, saving).
    with job_runs.keep_lease(
        settings.sqlalchemy_url, claim=claim, lease_seconds=settings.lease_seconds
    ):
        outcome = execute(claim, settings)
    if outcome in JOB_ENDING_OUTCOMES:
        remove_scratch(settings, claim.job_id)
    return outcome


def remove_scratch(settings: Settings, job_id: str) -> None:
    """Best effort, never changing the job; only once the database says it is terminal (a
    `failed` whose conditional end found the job re-queued to a newer attempt must leave
    that attempt's scratch alone). Every other ended job's scratch on this host goes too:
    a killed attempt's stays on its host when the retry ran on another, and the sweep runs
    on API hosts, which see only their own disk (found by bench/multihost.py)."""
    try:
        remove_scratch_of_ended_jobs(settings)  # job_id's among them once it is terminal
    except Exception:
        logger.warning("could not remove the scratch of job %s", job_id, exc_info=True)


def execute(claim: Claim, settings: Settings) -> RunOutcome:
    """Run a claimed job to its end: succeeded, failed, cancelled, lease_lost or
    db_unavailable. The caller holds the lease between steps and removes the scratch."""
    fix_mmap_threshold()  # the peak RSS follows live tensors, as the memory plan counts
    store = open_store(settings)
    if claim.attempt > 1:
        # What earlier attempts left (fenced off by this claim): the sweep removes it when
        # it re-queues the job, but a redelivered message can take over a lapsed lease first.
        remove_dead_attempts_leftovers(settings, [claim.job_id], older_than=time.time())
    progress = Progress(claim, settings, store)
    outcome = _run(claim, settings, store, progress)
    progress.finish(outcome)  # the experiment trackers learn how it ended
    return outcome


def _run(claim: Claim, settings: Settings, store: ArtifactStore, progress: Progress) -> RunOutcome:
    try:
        _train_and_publish(claim, settings, store, progress)
        return RunOutcome.SUCCEEDED
    except RunAborted as aborted:
        if aborted.reason == RunOutcome.PAUSED:  # the loop checkpointed: end the attempt
            with session_scope(settings.sqlalchemy_url) as session:
                return job_runs.pause_run(session, claim=claim)
        if aborted.reason == RunOutcome.CANCELLED:
            end(settings, claim, JobStatus.CANCELLED)
        return aborted.reason
    except JobInputError as exc:
        end(settings, claim, JobStatus.FAILED, exc.error)
        return RunOutcome.FAILED
    except RankLost as lost:  # like a dead worker: the job is retried from its last checkpoint
        logger.warning("job %s: %s; the sweep re-queues it", claim.job_id, lost)
        return RunOutcome.WORKER_LOST
    except OperationalError:  # the database went away: not the job's fault, so no `failed`
        logger.warning(
            "job %s lost its database; the sweep re-queues it", claim.job_id, exc_info=True
        )
        # the lease lapses; the sweep re-queues (max_attempts bounds it)
        return RunOutcome.DB_UNAVAILABLE
    except Exception as exc:  # the task boundary: record the failure for the user, then stop
        logger.exception("job %s failed", claim.job_id)
        message = f"training failed: {public_message(exc)}"  # the log has the paths
        error = {"code": "training_error", "message": message, "param": None}
        end(settings, claim, JobStatus.FAILED, error)
        return RunOutcome.FAILED


def end(
    settings: Settings, claim: Claim, status: JobStatus, error: dict[str, Any] | None = None
) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        job_runs.end_run(session, claim=claim, status=status, error=error)


def _train_and_publish(
    claim: Claim, settings: Settings, store: ArtifactStore, progress: Progress
) -> None:
    with store.temp_dir(owner=claim.job_id) as inputs_dir:  # this host's copy of the inputs
        _train_and_publish_from(claim, settings, store, inputs_dir, progress)


def _train_and_publish_from(
    claim: Claim, settings: Settings, store: ArtifactStore, inputs_dir: Path, progress: Progress
) -> None:
    from app.ml.loading import load_tokenizer
    from worker.training.loop import train_lora

    inputs = job_inputs.read_inputs(claim, settings, store, inputs_dir)
    # before loading: a job that cannot fit fails now, naming what would fit
    asked = inputs.spec.method.hyperparameters
    planned, shape = job_memory.plan_job(
        inputs.base_model_ref, asked, settings=settings, progress=progress
    )
    tokenizer = load_tokenizer(inputs.base_model_ref)
    model = job_inputs.load_base(inputs, device=settings.device)
    hp = _hyperparameters_to_run(inputs.spec, planned, model, progress)
    token_ids = job_inputs.trainable_tokens(tokenizer, hp.train_special_tokens, progress)
    train, valid = _encode(inputs, tokenizer, model, hp, progress)
    job_inputs.check_examples(hp, len(train), len(valid), WorkLimits.of(settings))
    total_steps = count_steps(len(train), hp)
    progress.announce_checkpoints(total_steps, hp.n_checkpoints)
    start = _start_from(inputs, job_inputs.resume_point(inputs, progress))
    oom = job_memory.out_of_memory_fails_the_job(
        shape, hp, settings=settings, steps=lambda: progress.steps_done
    )
    ranks = _data_parallel(settings, inputs, model, hp, train, token_ids, start, progress)
    with oom, store.temp_dir(owner=claim.job_id) as out, ranks as this_rank:
        progress.start(inputs.spec, hp, total_steps)
        result = train_lora(
            model=model,
            tokenizer=tokenizer,
            train_examples=train,
            valid_examples=valid,
            hyperparameters=hp,
            out_dir=out,
            trainable_token_ids=token_ids,
            eval_every_steps=settings.metrics_every_steps,
            on_step=progress.on_step,
            on_checkpoint=progress.on_checkpoint,
            on_micro_batch=progress.on_micro_batch,
            should_pause=progress.should_pause,
            scratch_dir=store.scratch_root(claim.job_id),
            ranks=this_rank,
            **start,
        )
        if result.early_stop is not None:  # the model is the best step's, not the last's
            result.sha256 = use_best_checkpoint(
                claim, store, progress, result.early_stop, out, inputs_dir
            )
        key = f"adapters/{claim.job_id}"
        published = store.publish_dir(out, key)  # uploaded, its manifest last
    _register(
        claim,
        settings,
        store,
        organization_id=inputs.organization_id,
        result=result,
        adapter_key=key,
        weights_bytes=published.files[ADAPTER_WEIGHTS].size,
        applied=_applied(hp, tokenizer, token_ids),
    )


def _applied(
    hp: SupervisedHyperparameters, tokenizer: Any, token_ids: tuple[int, ...]
) -> dict[str, Any]:
    """What ran, where it differs from what was asked: the adapter's `lora_config` says so."""
    return {
        "packing": hp.packing,
        "train_special_tokens": tokenizer.convert_ids_to_tokens(list(token_ids)) or False,
    }


def _register(
    claim: Claim,
    settings: Settings,
    store: ArtifactStore,
    *,
    organization_id: str,
    result: Any,
    adapter_key: str,
    weights_bytes: int,
    applied: dict[str, Any],
) -> None:
    """ONE transaction: the metrics CSV, the adapter in the registry and the job succeeded.
    A run cancelled or taken over at the last moment publishes nothing."""
    result_key = None
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            csv_row = files.create_result_file(
                session,
                organization_id=organization_id,
                content=metrics_csv(result.history),
                filename=f"{claim.job_id}-metrics.csv",
                store=store,
            )
            result_key = csv_row.storage_key
            publishing.complete_job(
                session,
                claim=claim,
                storage_key=adapter_key,
                sha256=result.sha256,
                size_bytes=weights_bytes,
                trained_tokens=result.trained_tokens,
                result_files=[csv_row.id],
                applied=applied,
                best_step=result.early_stop.best_step if result.early_stop else None,
            )
    except RunAborted:
        store.delete(adapter_key)
        if result_key is not None:
            store.delete(result_key)
        raise


class StartFrom(TypedDict):
    init_adapter: Path | None
    resume_from: Path | None


def _start_from(inputs: JobInputs, resume_from: Path | None) -> StartFrom:
    """`train_lora`'s start: the verified checkpoint to resume from, else the adapter the
    job continues (if any)."""
    init_adapter = inputs.parent_adapter if resume_from is None else None
    return {"init_adapter": init_adapter, "resume_from": resume_from}


def _data_parallel(
    settings: Settings,
    inputs: JobInputs,
    model: Any,
    hp: SupervisedHyperparameters,
    train: list[Example],
    token_ids: tuple[int, ...],
    start: StartFrom,
    progress: Progress,
) -> Any:
    """The job's ranks (a context manager): this process alone, or rank 0 of
    LORAFORGE_GPUS_PER_JOB data-parallel ranks (worker/training/distributed.py)."""
    from worker.training.distributed import data_parallel, peer_job

    world = settings.gpus_per_job
    if world > 1 and isinstance(hp, DpoHyperparameters):
        progress.event(  # a rank's share would split pairs; DPO's step is not reduced
            f"DPO trains on one device: data-parallel DPO is not supported yet "
            f"(LORAFORGE_GPUS_PER_JOB={world})",
            level="warn",
        )
        return data_parallel(None, None)
    if world == 1:
        return data_parallel(None, None)
    job = peer_job(
        world=world,
        base_model_ref=inputs.base_model_ref,
        quantization=hp.quantization,
        model=model,
        hyperparameters=hp,
        examples=train,
        trainable_token_ids=token_ids,
        **start,
    )
    progress.event(
        f"Training data-parallel on {world} ranks ({job.kind}): the same global batch and "
        "example order as on one device",
        data={"ranks": world, "device": job.device},
    )
    return data_parallel(job, inputs.scratch)


def _hyperparameters_to_run(
    spec: RunSpec, hp: SupervisedHyperparameters, model: Any, progress: Progress
) -> SupervisedHyperparameters:
    """The job's hyperparameters (as planned) checked against the loaded model, with
    `packing` as it will run: on only where the model isolates packed examples."""
    from worker.training.packing import enable_packing

    job_inputs.check_target_modules(model, hp.lora_target_modules)
    job_inputs.check_context(model, hp.max_seq_length, spec.base_model)
    if not hp.packing or enable_packing(model):
        return hp
    progress.event(
        "Packing is off: this model does not isolate packed examples, so packing "
        "would not be exact; training one example per sequence",
        level="warn",
    )
    return hp.model_copy(update={"packing": False})


def _encode(
    inputs: JobInputs,
    tokenizer: Any,
    model: Any,
    hp: SupervisedHyperparameters,
    progress: Progress,
) -> tuple[list[Example], list[Example]]:
    """Tokenize both files; report the dataset statistics and any truncation."""
    from worker.training.packing import epoch_steps, row_length

    def encode(path: Path, param: str) -> list[Example]:
        records = read_jsonl(path)
        if isinstance(hp, DpoHyperparameters):  # pairs: chosen, rejected, chosen, …
            chats = [chat for record in records for chat in conversations(record)]
            job_inputs.check_tool_calling(tokenizer, chats, param)
            return encode_preferences(tokenizer, records, max_seq_length=hp.max_seq_length)
        job_inputs.check_tool_calling(tokenizer, records, param)
        return encode_dataset(
            tokenizer, records, max_seq_length=hp.max_seq_length, train_on_inputs=hp.train_on_inputs
        )

    train = encode(inputs.training_path, "training_file")
    valid = (
        encode(inputs.validation_path, "validation_file")
        if inputs.validation_path is not None
        else []
    )
    first_epoch = epoch_steps(train, hp, max_len=row_length(model, hp.max_seq_length), epoch=1)
    rows = sum(len(micro) for step in first_epoch for micro in step.micro_batches)
    stats = {
        "examples": len(train) // hp.EXAMPLES_PER_ITEM,  # DPO: pairs
        "tokens": sum(len(e.input_ids) for e in train),
        "sequences_per_epoch": rows,
        "packing": hp.packing,
        "validation_examples": len(valid),
        "total_steps": count_steps(len(train), hp),
    }
    progress.event(
        f"Training on {stats['examples']} examples ({stats['tokens']} tokens) in "
        f"{rows} sequences per epoch, {stats['total_steps']} steps planned",
        data=stats,
    )
    truncated = sum(e.truncated for e in train) + sum(e.truncated for e in valid)
    if truncated:
        progress.event(
            f"{truncated} examples were longer than max_seq_length="
            f"{hp.max_seq_length} tokens and were truncated",
            level="warn",
            data={"truncated_examples": truncated, "max_seq_length": hp.max_seq_length},
        )
    return train, valid
