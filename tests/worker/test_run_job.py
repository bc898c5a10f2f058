"""run_job against a real database and the tiny model: the worker half of the data path."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app import tenancy
from app.db.base import utcnow
from app.db.models import Adapter, Checkpoint, File, Job, JobEvent
from app.db.session import session_scope
from app.jobs import publishing
from app.jobs import runs as job_runs
from app.jobs import service as jobs
from app.ml.adapters import ADAPTER_WEIGHTS
from app.storage import LocalStore, file_sha256
from tests.factories import load, submit
from worker import run_job as run_job_module
from worker.run_job import run_job

pytestmark = pytest.mark.slow


def test_a_job_trains_publishes_and_registers(backend):
    job_id = submit(backend)
    assert run_job(job_id, settings=backend) == "succeeded"
    [job] = load(backend, Job, id=job_id)
    assert job.status == "succeeded" and job.finished_at is not None and job.error is None
    assert job.fine_tuned_model == f"ft:tiny:acme:demo:{job_id}" and job.trained_tokens > 0
    [adapter] = load(backend, Adapter, job_id=job_id)
    store = LocalStore(backend.artifacts_dir)
    folder = store.path(adapter.storage_key)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert adapter.sha256 == file_sha256(folder / ADAPTER_WEIGHTS) and adapter.status == "active"
    assert adapter.lora_config == job.hyperparameters and adapter.size_bytes > 0
    checkpoints = sorted(load(backend, Checkpoint, job_id=job_id), key=lambda c: c.step_number)
    assert [c.step_number for c in checkpoints] == [2, 4]  # one per epoch, 6 examples / batch 3
    for checkpoint in checkpoints:
        assert (
            checkpoint.fine_tuned_model_checkpoint
            == f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        )
        assert checkpoint.sha256 == file_sha256(
            store.path(checkpoint.storage_key) / ADAPTER_WEIGHTS
        )
        assert checkpoint.metrics["train_loss"] > 0
    metrics = [e.data for e in load(backend, JobEvent, job_id=job_id) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(
        m["train_loss"] > 0 for m in metrics
    )
    assert not any((backend.artifacts_dir / "tmp").iterdir())


def test_a_duplicate_delivery_does_nothing(backend):
    job_id = submit(backend)
    assert run_job(job_id, settings=backend) == "succeeded"
    events_before = len(load(backend, JobEvent, job_id=job_id))
    assert run_job(job_id, settings=backend) == "skipped"
    assert len(load(backend, JobEvent, job_id=job_id)) == events_before
    assert len(load(backend, Adapter, job_id=job_id)) == 1


def test_cancel_during_training_publishes_nothing(settings, monkeypatch):
    job_id = submit(settings, n_epochs=3)
    real_on_step = run_job_module.Progress.on_step

    def cancel_at_step_two(self, report):
        if report.step == 2:
            with session_scope(settings.sqlalchemy_url) as session:
                organization = tenancy.get_or_create_organization(session, name="acme")
                assert (
                    jobs.cancel_job(session, organization=organization, job_id=job_id).status
                    == "running"
                )
        real_on_step(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_step", cancel_at_step_two)
    assert run_job(job_id, settings=settings) == "cancelled"
    [job] = load(settings, Job, id=job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert load(settings, Adapter, job_id=job_id) == []
    assert not (settings.artifacts_dir / "adapters" / job_id).exists()
    steps = [e.data["step"] for e in load(settings, JobEvent, job_id=job_id) if e.type == "metrics"]
    assert steps == [1]  # the step-2 check saw the flag: no later step ran


def test_cancel_in_a_long_accumulation_stops_at_the_next_micro_batch(settings, monkeypatch):
    """One optimizer step is the whole epoch (6 examples, batch 1, accumulation 6): a cancel
    during its second micro-batch must not wait for the step to end (issue 14, finding 6)."""
    from worker.training import supervised  # its objective collates each micro-batch

    job_id = submit(settings, n_epochs=1, batch_size=1, gradient_accumulation_steps=6)
    micro_batches, real_collate = [], supervised.collate

    def cancel_in_the_second(*args, **kwargs):
        micro_batches.append(1)
        if len(micro_batches) == 2:
            with session_scope(settings.sqlalchemy_url) as session:
                organization = tenancy.get_or_create_organization(session, name="acme")
                jobs.cancel_job(session, organization=organization, job_id=job_id)
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(supervised, "collate", cancel_in_the_second)
    assert run_job(job_id, settings=settings) == "cancelled"
    assert len(micro_batches) == 2  # the check before the third forward saw the flag
    assert [e for e in load(settings, JobEvent, job_id=job_id) if e.type == "metrics"] == []
    assert load(settings, Job, id=job_id)[0].status == "cancelled"


def test_a_running_job_shows_its_progress(backend, monkeypatch):
    """trained_tokens, estimated_finish and the step counts fill in while the job runs."""
    from app.api.views import job_view

    job_id = submit(backend)  # 2 epochs of 2 steps
    real_on_step = run_job_module.Progress.on_step
    seen = []

    def on_step(self, report):
        real_on_step(self, report)
        with session_scope(backend.sqlalchemy_url) as session:
            seen.append(job_view(session.get_one(Job, job_id)).model_dump())

    monkeypatch.setattr(run_job_module.Progress, "on_step", on_step)
    started = int(utcnow().timestamp())
    assert run_job(job_id, settings=backend) == "succeeded"
    assert [(v["status"], v["steps_completed"], v["steps_planned"]) for v in seen] == [
        ("running", step, 4) for step in (1, 2, 3, 4)
    ]
    tokens = [v["trained_tokens"] for v in seen]
    assert 0 < tokens[0] < tokens[1] < tokens[2] < tokens[3]
    assert all(v["estimated_finish"] >= started for v in seen)
    with session_scope(backend.sqlalchemy_url) as session:
        done = job_view(session.get_one(Job, job_id))
    assert done.trained_tokens == tokens[-1] and done.estimated_finish is None  # not running


def test_a_deleted_training_file_fails_the_job_with_an_actionable_error(settings):
    job_id = submit(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        session.delete(session.scalar(select(File)))
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.status == "failed" and job.error["code"] == "file_not_found"
    assert job.error["param"] == "training_file" and "deleted" in job.error["message"]


def test_a_max_seq_length_past_the_models_context_fails_the_job_naming_it(settings):
    """The API refuses it for a local model; a hub model's context is known only here."""
    job_id = submit(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get_one(Job, job_id)
        job.hyperparameters = job.hyperparameters | {"max_seq_length": 4096}
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "max_seq_length_too_long"
    assert job.error["param"] == "hyperparameters.max_seq_length"
    assert "1024 positions" in job.error["message"]


def test_a_base_model_removed_from_the_allowlist_fails_the_job(settings):
    job_id = submit(settings)
    assert run_job(job_id, settings=settings.model_copy(update={"base_models": {}})) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "model_not_available" and job.error["param"] == "model"


def test_a_live_lease_fences_out_a_second_worker_and_an_expired_one_is_taken_over(settings):
    job_id = submit(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        stale = job_runs.claim_job(
            session, job_id=job_id, worker="w1", lease_seconds=60, max_attempts=3
        )
    assert stale.attempt == 1
    assert run_job(job_id, settings=settings) == "skipped"
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    assert job.attempt == 2
    with (
        session_scope(settings.sqlalchemy_url) as session,
        pytest.raises(job_runs.RunAborted) as aborted,
    ):
        job_runs.renew_lease(session, claim=stale, lease_seconds=60)
    assert aborted.value.reason == "lease_lost"
    with session_scope(settings.sqlalchemy_url) as session, pytest.raises(job_runs.RunAborted):
        publishing.complete_job(
            session, claim=stale, storage_key="x", sha256="0" * 64, size_bytes=1, trained_tokens=1
        )
    assert len(load(settings, Adapter, job_id=job_id)) == 1


def test_the_sweep_requeues_lost_messages_and_dead_workers(settings):
    queued, dead, cancelled, exhausted = (submit(settings) for _ in range(4))
    past = utcnow() - timedelta(hours=1)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, queued).enqueued_at = past
        for job_id in (dead, cancelled, exhausted):
            job = session.get(Job, job_id)
            job.status, job.lease_expires_at, job.attempt, job.enqueued_at = (
                "running",
                past,
                1,
                utcnow(),
            )
        session.get(Job, cancelled).cancel_requested = True
        session.get(Job, exhausted).attempt = 3
    with session_scope(settings.sqlalchemy_url) as session:
        requeued = job_runs.sweep(session, requeue_after_seconds=60, max_attempts=3)
    assert sorted(requeued) == sorted([queued, dead])
    status = {job.id: (job.status, job.error and job.error["code"]) for job in load(settings, Job)}
    assert status[dead] == ("queued", None) and status[queued] == ("queued", None)
    assert status[cancelled] == ("cancelled", None) and status[exhausted] == (
        "failed",
        "worker_lost",
    )
    with session_scope(settings.sqlalchemy_url) as session:
        assert job_runs.sweep(session, requeue_after_seconds=60, max_attempts=3) == []
    assert run_job(dead, settings=settings) == "succeeded"


@pytest.mark.parametrize("exact", [True, False])
def test_the_adapter_records_whether_packing_ran(backend, monkeypatch, exact):
    import worker.training.packing

    monkeypatch.setattr(worker.training.packing, "packing_is_exact", lambda model: exact)
    job_id = submit(backend, packing=True)
    assert run_job(job_id, settings=backend) == "succeeded"
    [job] = load(backend, Job, id=job_id)
    [adapter] = load(backend, Adapter, job_id=job_id)
    assert job.hyperparameters["packing"] is True  # what was asked
    assert adapter.lora_config == {**job.hyperparameters, "packing": exact}  # what ran
    if exact:
        return
    events = [e.message for e in load(backend, JobEvent, job_id=job_id)]
    assert any(message.startswith("Packing is off") for message in events)
