"""run_job with the training engine's features: resume after a dead worker, result file,
continued training, retention, checkpoint download, dataset events, target modules.
"""

from __future__ import annotations

import csv
import io
import zipfile

import pytest

from app.db.models import Adapter, Checkpoint, File, Job
from app.db.session import session_scope
from app.errors import InvalidRequest
from app.storage import LocalStore
from tests.conftest import make_settings
from tests.factories import (
    WorkerDied,
    api_client,
    die_at,
    expire_lease,
    load,
    messages,
    submit,
    weights,
)
from worker.run_job import run_job

pytestmark = pytest.mark.slow


def test_a_job_whose_worker_died_resumes_exactly_from_its_checkpoint(settings, monkeypatch):
    hp = {"n_epochs": 3, "lora_dropout": 0.1}
    reference = submit(settings, **hp)
    assert run_job(reference, settings=settings) == "succeeded"
    job_id = submit(settings, **hp)  # same seed, data and hyperparameters
    die_at(monkeypatch, 3)  # epoch 2 of 3; the checkpoint at step 2 is complete
    with pytest.raises(WorkerDied):
        run_job(job_id, settings=settings)
    monkeypatch.undo()
    expire_lease(settings, job_id)
    assert run_job(job_id, settings=settings) == "succeeded"

    events = [e.message for e in messages(settings, job_id)]
    assert "Resuming from the checkpoint at step 2" in events
    steps = [e.data["step"] for e in messages(settings, job_id) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]  # attempt 1: 1-2, attempt 2: 3-6 (3 never reported)
    a, b = weights(settings, reference), weights(settings, job_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_tampered_checkpoint_is_not_resumed_from(settings, monkeypatch):
    job_id = submit(settings, n_epochs=3)
    die_at(monkeypatch, 3)
    with pytest.raises(WorkerDied):
        run_job(job_id, settings=settings)
    monkeypatch.undo()
    [checkpoint] = load(settings, Checkpoint, job_id=job_id)
    state = LocalStore(settings.artifacts_dir).path(checkpoint.storage_key) / "trainer_state.json"
    state.write_text(state.read_text().replace('"next_batch": 0', '"next_batch": 1'))
    expire_lease(settings, job_id)
    assert run_job(job_id, settings=settings) == "succeeded"
    events = messages(settings, job_id)
    assert any("Skipping checkpoint at step 2" in e.message and e.level == "warn" for e in events)
    assert not any(e.message.startswith("Resuming") for e in events)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == [1, 2, 1, 2, 3, 4, 5, 6]  # started over


def test_metrics_csv_is_a_downloadable_result_file(settings):
    job_id = submit(settings)
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    [file_id] = job.result_files
    [row] = load(settings, File, id=file_id)
    assert row.purpose == "fine-tune-results" and row.organization_id == job.organization_id
    client = api_client(settings)
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")  # not called JSONL
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["step"] for r in table] == ["1", "2", "3", "4"]
    assert set(table[0]) == {
        "step",
        "train_loss",
        "valid_loss",
        "learning_rate",
        "tokens_per_second",
        "full_valid_loss",
    }
    assert all(float(r["train_loss"]) > 0 and float(r["tokens_per_second"]) > 0 for r in table)
    assert client.get(f"/v1/files/{file_id}").json()["purpose"] == "fine-tune-results"


def test_checkpoints_are_downloadable_and_old_ones_pruned(tmp_path, tiny_model_dir):
    """n_checkpoints=4 over 6 steps (3 epochs of 2): steps 2, 3, 5, 6; retention keeps 2."""
    from app import migrate

    settings = make_settings(tmp_path / "data", tiny_model_dir, checkpoint_retention=2)
    migrate.upgrade(settings)
    job_id = submit(settings, n_epochs=3, n_checkpoints=4)
    assert run_job(job_id, settings=settings) == "succeeded"
    rows = load(settings, Checkpoint, job_id=job_id)
    assert sorted((c.step_number, c.status) for c in rows) == [
        (2, "pruned"), (3, "pruned"), (5, "active"), (6, "active"),
    ]  # fmt: skip
    for step in (2, 3):
        assert not (settings.artifacts_dir / "checkpoints" / job_id / f"step-{step}").exists()
    events = messages(settings, job_id)
    [plan] = [e for e in events if "checkpoints planned" in e.message]
    assert plan.data == {"checkpoint_steps": [2, 3, 5, 6], "checkpoint_retention": 2}
    notes = [e for e in events if e.message.startswith("Checkpoint")]
    assert [n.data["step"] for n in notes] == [2, 3, 5, 6]
    assert [n.data.get("pruned_steps") for n in notes] == [None, None, [2], [3]]
    assert notes[3].message == (
        "Checkpoint created at step 6; pruned by retention: step 3 (a job keeps its newest 2 "
        "checkpoints, LORAFORGE_CHECKPOINT_RETENTION)"
    )
    [job] = load(settings, Job, id=job_id)
    client = api_client(settings)
    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in listed] == [6, 5]
    response = client.get(f"/v1/models/{job.fine_tuned_model}:ckpt-step-5/adapter")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    pruned = f"{job.fine_tuned_model}:ckpt-step-3"
    for gone in (
        client.get(f"/v1/models/{pruned}/adapter"),
        client.get(f"/v1/models/{pruned}"),
        client.post("/v1/completions", json={"model": pruned, "prompt": "x", "max_tokens": 1}),
    ):
        assert gone.status_code == 404
        error = gone.json()["error"]
        assert error["code"] == "checkpoint_pruned" and error["param"] == "model"
        assert "pruned by retention" in error["message"]
        assert "LORAFORGE_CHECKPOINT_RETENTION" in error["message"]


def test_continue_training_from_an_adapter(settings):
    first = submit(settings, lora_r=4)
    assert run_job(first, settings=settings) == "succeeded"
    [parent] = load(settings, Job, id=first)
    second = submit(settings, model=parent.fine_tuned_model, lora_r=16)
    [job] = load(settings, Job, id=second)
    assert job.model == "tiny" and job.parent_model == parent.fine_tuned_model
    assert job.hyperparameters["lora_r"] == 4  # the parent's LoRA shape is kept
    assert run_job(second, settings=settings) == "succeeded"
    loss = {
        j: next(e.data["train_loss"] for e in messages(settings, j) if e.type == "metrics")
        for j in (first, second)
    }
    assert loss[second] < loss[first]  # starts where the parent left off


def test_continuing_an_unknown_adapter_is_refused_and_nothing_stored(settings):
    with pytest.raises(InvalidRequest) as caught:
        submit(settings, model="ft:tiny:acme:demo:ftjob-nope")
    assert caught.value.param == "model"
    assert load(settings, Job) == []


def test_unknown_target_modules_are_refused_at_creation(settings):
    with pytest.raises(InvalidRequest) as caught:
        submit(settings, lora_target_modules=["q_proj", "attn_qkv"])
    assert caught.value.param == "hyperparameters.lora_target_modules"
    assert load(settings, Job) == []


def test_unknown_target_modules_fail_the_job_when_only_the_worker_can_check(settings):
    job_id = submit(settings, lora_target_modules=["q_proj"])
    with session_scope(settings.sqlalchemy_url) as session:  # e.g. a hub model: unchecked before
        session.get(Job, job_id).hyperparameters = session.get(Job, job_id).hyperparameters | {
            "lora_target_modules": ["attn_qkv"]
        }
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["param"] == "hyperparameters.lora_target_modules"
    assert "attn_qkv" in job.error["message"] and load(settings, Adapter) == []


def test_dataset_statistics_truncation_and_packing_are_reported(settings):
    rows = [{"text": "y" * n} for n in (10, 20, 90, 12, 8, 15)]  # one longer than 64 tokens
    job_id = submit(settings, rows=rows, max_seq_length=64, packing="auto", batch_size=3)
    assert run_job(job_id, settings=settings) == "succeeded"
    events = messages(settings, job_id)
    [stats] = [
        e.data for e in events if e.data and "total_steps" in e.data and "examples" in e.data
    ]
    assert stats["examples"] == 6 and stats["packing"] is True
    assert stats["total_steps"] == 4  # 2 epochs of 2 steps: packing keeps 3 examples a step
    # the tiny Llama runs segment attention, so each step's examples share one unpadded
    # row (the truncated 64-token one included): one row per step
    assert stats["sequences_per_epoch"] == 2
    [warning] = [e for e in events if e.data and "truncated_examples" in e.data]
    assert warning.level == "warn" and warning.data["truncated_examples"] == 1
    steps = [e.data for e in events if e.type == "metrics"]
    assert len(steps) == stats["total_steps"]
