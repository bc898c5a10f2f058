"""Evaluations during training, early stopping and continuing from a checkpoint, with the
real trainer (docs/design.md 4.17)."""

from __future__ import annotations

import csv
import io

import pytest
from safetensors.torch import load_file

from app.db.models import Adapter, Checkpoint, File, Job, JobEvent
from app.ml.adapters import ADAPTER_WEIGHTS
from app.storage import file_sha256, open_store
from tests.factories import chat_rows, load, submit
from worker.run_job import run_job

pytestmark = pytest.mark.slow


def published(settings, storage_key: str, into: str):
    return open_store(settings).local_dir(storage_key, settings.data_dir / into)


def test_early_stopping_ends_succeeded_and_serves_the_best_checkpoint(backend):
    settings = backend
    # 8 steps (2 per epoch), an evaluation at every one. No later evaluation can beat the
    # first by more than the threshold, so patience 2 ends the run at step 3 with step 1 best.
    job_id = submit(
        settings,
        validation_rows=chat_rows(4),
        n_epochs=4,
        n_evals=8,
        early_stopping_patience=2,
        early_stopping_threshold=100,
    )
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    assert (job.status, job.best_step, job.steps_completed) == ("succeeded", 1, 3)
    [adapter] = load(settings, Adapter, job_id=job_id)
    [best] = load(settings, Checkpoint, job_id=job_id, step_number=1)
    served = published(settings, adapter.storage_key, "served")
    assert adapter.sha256 == best.sha256 == file_sha256(served / ADAPTER_WEIGHTS)
    [last] = load(settings, Checkpoint, job_id=job_id, step_number=2)
    assert last.sha256 != best.sha256  # the weights moved on; the model is the best step's

    events = load(settings, JobEvent, job_id=job_id)
    evaluated = [e.data for e in events if e.type == "metrics" and e.data["full_valid_loss"]]
    assert [m["step"] for m in evaluated] == [1, 2, 3]  # during the epochs too
    [stop] = [e for e in events if e.message.startswith("Early stopping at step 3")]
    assert stop.data["best_step"] == 1 and "checkpoint at step 1" in stop.message
    [csv_file] = load(settings, File, id=job.result_files[0])
    with open_store(settings).open(csv_file.storage_key) as content:
        table = list(csv.DictReader(io.StringIO(content.read().decode())))
    assert [bool(row["full_valid_loss"]) for row in table] == [True, True, True]


def test_a_job_continues_from_a_checkpoint_id(settings):
    first = submit(settings)  # 4 steps, checkpoints at 2 and 4
    assert run_job(first, settings=settings) == "succeeded"
    [ckpt] = load(settings, Checkpoint, job_id=first, step_number=2)
    # A learning rate too small to move the weights: the result is the checkpoint's adapter.
    second = submit(settings, model=ckpt.fine_tuned_model_checkpoint, learning_rate=1e-12)
    [job] = load(settings, Job, id=second)
    assert (job.model, job.parent_model) == ("tiny", ckpt.fine_tuned_model_checkpoint)
    assert run_job(second, settings=settings) == "succeeded"
    [adapter] = load(settings, Adapter, job_id=second)
    result = load_file(published(settings, adapter.storage_key, "result") / ADAPTER_WEIGHTS)
    start = load_file(published(settings, ckpt.storage_key, "start") / ADAPTER_WEIGHTS)
    assert set(result) == set(start)
    assert max(float((result[k] - start[k]).abs().max()) for k in start) <= 1e-6
