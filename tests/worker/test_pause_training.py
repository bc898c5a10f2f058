"""Pause and resume with the real trainer (docs/design.md 4.16): a job paused mid-run
checkpoints the step it was asked at, ends its attempt `paused` (that checkpoint callable
meanwhile), and once resumed trains the same steps with the same losses as a run that was
never paused, to the same adapter."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from app.db.models import Adapter, Checkpoint, Job, JobEvent
from app.jobs import pause as pausing
from app.ml.adapters import ADAPTER_WEIGHTS
from app.storage import open_store
from tests.factories import api_client, job_action, load, submit
from worker import run_job as run_job_module
from worker.run_job import run_job

pytestmark = pytest.mark.slow
HP = {"n_epochs": 3, "lora_dropout": 0.1}  # 6 steps, checkpoints at 2, 4, 6; dropout: RNG


def pause_during(monkeypatch, settings, step: int) -> None:
    """Ask for a pause while `step` trains (before its report renews the lease)."""
    real = run_job_module.Progress.on_step

    def on_step(self, report):
        if report.step == step:
            assert job_action(settings, pausing.pause_job, self.claim.job_id) == "running"
        real(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_step", on_step)


def losses(settings, job_id: str) -> list[tuple[int, float]]:
    events = load(settings, JobEvent, job_id=job_id)
    return [(e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics"]


def adapter_weights(settings, job_id: str) -> dict:
    [adapter] = load(settings, Adapter, job_id=job_id)
    folder = open_store(settings).local_dir(adapter.storage_key, settings.data_dir / job_id)
    return load_file(folder / ADAPTER_WEIGHTS)


def test_a_paused_job_resumes_to_the_same_losses_and_adapter(backend, monkeypatch):
    settings = backend
    reference = submit(settings, **HP)
    assert run_job(reference, settings=settings) == "succeeded"

    job_id = submit(settings, **HP)  # same seed, data and hyperparameters
    pause_during(monkeypatch, settings, 3)
    assert run_job(job_id, settings=settings) == "paused"
    monkeypatch.undo()
    [job] = load(settings, Job, id=job_id)
    assert (job.status, job.pause_requested, job.pauses, job.steps_completed) == (
        "paused",
        False,
        1,
        3,
    )
    steps = sorted(c.step_number for c in load(settings, Checkpoint, job_id=job_id))
    assert steps == [2, 3]  # the scheduled one, and the pause's at step 3
    assert run_job(job_id, settings=settings) == "skipped"  # paused: nothing to claim

    [ckpt] = load(settings, Checkpoint, job_id=job_id, step_number=3)
    name = ckpt.fine_tuned_model_checkpoint
    answer = api_client(settings).post(
        "/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert answer.status_code == 200, answer.text  # callable while paused

    assert job_action(settings, pausing.resume_job, job_id) == "queued"
    assert run_job(job_id, settings=settings) == "succeeded"
    messages = [e.message for e in load(settings, JobEvent, job_id=job_id)]
    assert "Resuming from the checkpoint at step 3" in messages
    assert any(m.startswith("Fine-tuning job paused at step 3") for m in messages)
    steps, paused_losses = zip(*losses(settings, job_id), strict=True)
    reference_steps, reference_losses = zip(*losses(settings, reference), strict=True)
    assert steps == reference_steps == (1, 2, 3, 4, 5, 6)  # each step once, none repeated
    assert paused_losses == pytest.approx(reference_losses, abs=1e-6)
    a, b = adapter_weights(settings, reference), adapter_weights(settings, job_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
