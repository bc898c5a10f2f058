"""DPO jobs in the worker: exact resume, metrics and result file, DPO after SFT, cancel,
validation metrics."""

from __future__ import annotations

import csv
import io
import math

import pytest

from app.db.models import Checkpoint, Job
from app.jobs.hyperparameters import resolve
from app.ml.loading import load_base_model
from app.schemas.jobs import DpoHyperparameters
from tests.factories import (
    WorkerDied,
    api_client,
    die_at,
    expire_lease,
    load,
    messages,
    preference_rows,
    submit,
    weights,
)
from worker.run_job import run_job
from worker.training.loop import CheckpointReport, StepReport, train_lora
from worker.training.preference_data import encode_preferences

pytestmark = pytest.mark.slow


def test_a_dpo_job_resumes_exactly_and_reports_reward_metrics(settings, monkeypatch):
    hp = {"n_epochs": 3, "lora_dropout": 0.1, "packing": True}
    reference = submit(settings, method="dpo", **hp)
    assert run_job(reference, settings=settings) == "succeeded"
    job_id = submit(settings, method="dpo", **hp)  # same seed, data and hyperparameters
    die_at(monkeypatch, 3)  # epoch 2 of 3; the checkpoint at step 2 is complete
    with pytest.raises(WorkerDied):
        run_job(job_id, settings=settings)
    monkeypatch.undo()
    expire_lease(settings, job_id)
    assert run_job(job_id, settings=settings) == "succeeded"

    a, b = weights(settings, reference), weights(settings, job_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    metrics = [e.data for e in messages(settings, job_id) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= m["train_reward_accuracy"] <= 1 for m in metrics)
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2))  # policy = reference
    assert metrics[-1]["train_reward_margin"] > 0  # it learnt to prefer the chosen answers
    [job] = load(settings, Job, id=job_id)
    assert job.method == "dpo" and len(load(settings, Checkpoint, job_id=job_id)) == 3
    response = api_client(settings).get(f"/v1/files/{job.result_files[0]}/content")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert "train_reward_margin" in rows[0] and len(rows) == 6


def test_dpo_after_sft_starts_from_the_adapter_as_its_reference(settings):
    sft = submit(settings, n_epochs=2)
    assert run_job(sft, settings=settings) == "succeeded"
    [parent] = load(settings, Job, id=sft)
    job_id = submit(settings, method="dpo", model=parent.fine_tuned_model)
    assert run_job(job_id, settings=settings) == "succeeded"
    metrics = [e.data for e in messages(settings, job_id) if e.type == "metrics"]
    # the new adapter starts as the SFT one, which is the reference: every reward is 0
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["train_reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_validation_reports_reward_margin_and_accuracy(tiny_model_dir, tokenizer, tmp_path):
    records = preference_rows(8)
    asked = DpoHyperparameters(n_epochs=2, batch_size=2, learning_rate=3e-3, n_checkpoints=1)
    steps: list[StepReport] = []
    checkpoints: list[CheckpointReport] = []
    train_lora(
        model=load_base_model(tiny_model_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=encode_preferences(tokenizer, records[:6], max_seq_length=64),
        valid_examples=encode_preferences(tokenizer, records[6:], max_seq_length=64),
        hyperparameters=resolve(asked, n_examples=6, seed=1),
        out_dir=tmp_path / "out",
        eval_every_steps=2,
        on_step=steps.append,
        on_checkpoint=checkpoints.append,
    )
    assert [s.step for s in steps if "valid_reward_accuracy" in s.metrics] == [2, 4, 6]
    assert all(s.valid_loss is not None for s in steps if s.step % 2 == 0)
    [checkpoint] = checkpoints
    assert set(checkpoint.metrics) == {"valid_reward_margin", "valid_reward_accuracy"}
    assert checkpoint.valid_loss is not None and checkpoint.valid_loss > 0


def test_a_cancel_stops_dpo_before_the_reference_pass_ends(tiny_model_dir, tokenizer, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel() -> None:
        raise Cancelled

    asked = DpoHyperparameters(n_epochs=1, batch_size=2)
    with pytest.raises(Cancelled):
        train_lora(
            model=load_base_model(tiny_model_dir, device="cpu"),
            tokenizer=tokenizer,
            train_examples=encode_preferences(tokenizer, preference_rows(4), max_seq_length=64),
            valid_examples=[],
            hyperparameters=resolve(asked, n_examples=4, seed=1),
            out_dir=tmp_path / "out",
            on_micro_batch=cancel,
        )
    assert not (tmp_path / "out").exists()
