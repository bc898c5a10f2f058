"""Memory planning through the worker (worker/job_memory.py): a job that cannot fit fails
before its base is loaded, naming what would fit; "auto" knobs are decided and shown on the
job; an out-of-memory error in a step fails only that job (`out_of_memory`), publishes
nothing, and the worker takes the next job."""

from __future__ import annotations

import pytest
import torch

from app.db.models import Adapter, Checkpoint, Job, JobEvent
from app.jobs.spec import RunSpec, SupervisedHyperparameters
from tests.factories import load, submit
from worker import run_job as run_job_module
from worker.job_memory import model_shape
from worker.run_job import run_job
from worker.training.memory_estimate import estimate
from worker.training.memory_plan import leanest

pytestmark = pytest.mark.slow


def asked(settings, job_id: str) -> SupervisedHyperparameters:
    [job] = load(settings, Job, id=job_id)
    return RunSpec.of_job(job).method.hyperparameters


def cpu_need(model_dir, hp: SupervisedHyperparameters) -> int:
    shape = model_shape(str(model_dir))
    assert shape is not None
    return estimate(shape, hp, device="cpu").total


def published_nothing(settings, job_id: str) -> bool:
    return (
        load(settings, Adapter, job_id=job_id) == []
        and load(settings, Checkpoint, job_id=job_id) == []
        and not (settings.artifacts_dir / "adapters" / job_id).exists()
        and not (settings.artifacts_dir / "tmp" / job_id).exists()
    )


def test_a_job_that_cannot_fit_fails_before_loading_naming_what_would(
    settings, tiny_model_dir, monkeypatch
):
    job_id = submit(settings, batch_size=4, max_seq_length=1024)
    # room for the leanest settings at max_seq_length 256, not at 320 (the next multiple of 64)
    shorter = leanest(asked(settings, job_id)).model_copy(update={"max_seq_length": 256})
    capped = settings.model_copy(
        update={"training_memory_bytes": cpu_need(tiny_model_dir, shorter)}
    )

    def never(*_args, **_kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("app.ml.loading.load_base_model", never)
    assert run_job(job_id, settings=capped) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "out_of_memory"
    assert job.error["param"] == "hyperparameters.max_seq_length"
    message = job.error["message"]
    assert "Smallest change that fits: max_seq_length ≤ 256" in message
    assert "gradient_checkpointing on, micro-batches of 1 example" in message
    assert "LORAFORGE_TRAINING_MEMORY_BYTES" in message
    assert published_nothing(settings, job_id)


def test_auto_settings_are_planned_and_shown_on_the_job(settings, tiny_model_dir):
    job_id = submit(settings, batch_size=4, max_seq_length=1024, n_epochs=1)
    request = asked(settings, job_id)
    assert request.gradient_checkpointing == request.gradient_accumulation_steps == "auto"
    # room for checkpointing with 2 micro-batches of 2 examples, not with one of 4
    split = {"gradient_checkpointing": True, "batch_size": 2, "gradient_accumulation_steps": 2}
    whole = split | {"batch_size": 4, "gradient_accumulation_steps": 1}
    room = cpu_need(tiny_model_dir, request.model_copy(update=split))
    assert cpu_need(tiny_model_dir, request.model_copy(update=whole)) > room
    capped = settings.model_copy(update={"training_memory_bytes": room})

    assert run_job(job_id, settings=capped) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    assert {k: job.hyperparameters[k] for k in split} == split
    [adapter] = load(settings, Adapter, job_id=job_id)
    assert {k: adapter.lora_config[k] for k in split} == split
    [event] = [e for e in load(settings, JobEvent, job_id=job_id) if "Memory plan" in e.message]
    assert event.data["gradient_accumulation_steps"] == 2 and event.data["batch_size"] == 2
    assert event.data["estimate_bytes"]["total"] <= event.data["available_bytes"] == room
    assert job.steps_planned == 2  # 6 examples, 4 per step: the batch asked, in two halves


def test_a_job_with_room_keeps_the_fastest_settings(settings):
    job_id = submit(settings, n_epochs=1)
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    assert job.hyperparameters["gradient_checkpointing"] is False
    assert job.hyperparameters["gradient_accumulation_steps"] == 1
    assert job.hyperparameters["batch_size"] == 3


CPU_ALLOCATION_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(CPU_ALLOCATION_FAILURE),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
    ],
    ids=["cpu-allocator", "cuda", "memory-error"],
)
def test_out_of_memory_in_a_step_fails_the_job_and_the_worker_takes_the_next(
    settings, monkeypatch, error
):
    first, second = submit(settings), submit(settings)
    real = run_job_module.Progress.on_micro_batch

    def out_of_memory_in_step_two(self):
        if self.claim.job_id == first and self.steps_done == 1:
            raise error
        real(self)

    monkeypatch.setattr(run_job_module.Progress, "on_micro_batch", out_of_memory_in_step_two)
    # In this process: the error ends the job, not the process, which runs the next job.
    # (The resident worker runs each in a forked child and claims again whatever the child
    # reports, tests/worker/test_supervisor.py; a fork of this process, whose torch thread
    # pool already ran, would hang in OpenMP, so the real-process check is a chaos test.)
    assert run_job(first, settings=settings) == "failed"
    assert run_job(second, settings=settings) == "succeeded"
    jobs = {job.id: job for job in load(settings, Job)}
    assert jobs[first].error["code"] == "out_of_memory"
    assert jobs[first].error["param"] == "hyperparameters.gradient_checkpointing"
    message = jobs[first].error["message"]
    assert message.startswith("Training ran out of cpu memory at step 2 with")
    assert "Smallest change that fits: set gradient_checkpointing=true" in message
    assert published_nothing(settings, first)
    assert jobs[second].status == "succeeded" and jobs[second].fine_tuned_model


def test_other_errors_stay_training_errors(settings, monkeypatch):
    job_id = submit(settings)

    def broken(_self):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(run_job_module.Progress, "on_micro_batch", broken)
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "training_error"
