"""A failed job's error and its events never show where the server keeps its files."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db.models import Job, JobEvent
from app.db.session import session_scope
from tests.factories import submit
from worker import job_inputs
from worker import run_job as run_job_module
from worker.run_job import run_job

pytestmark = pytest.mark.slow


def shown(settings, job_id: str) -> str:
    """Everything a tenant can read about the job: its error and its events."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id))
        return repr(job.error) + "\n".join(events)


def test_a_dataset_vanishing_mid_run_fails_without_the_server_path(backend, monkeypatch):
    """The probe: the stored dataset went away after the job had started."""
    job_id = submit(backend)
    real = job_inputs.read_inputs

    def read_then_lose_the_dataset(*args, **kwargs):
        inputs = real(*args, **kwargs)
        inputs.training_path.unlink()
        return inputs

    monkeypatch.setattr(job_inputs, "read_inputs", read_then_lose_the_dataset)
    assert run_job(job_id, settings=backend) == "failed"
    text = shown(backend, job_id)
    assert "training_error" in text and "FileNotFoundError" in text  # says what failed
    assert str(backend.data_dir) not in text and "/artifacts/" not in text, text


def test_an_unexpected_error_naming_a_path_is_scrubbed(backend, monkeypatch):
    job_id = submit(backend)
    secret_dir = backend.artifacts_dir / "datasets"

    def fail(*_args, **_kwargs):
        raise OSError(f"cannot map {secret_dir}/shard-00001.bin (errno 12)")

    monkeypatch.setattr(run_job_module, "_hyperparameters_to_run", fail)
    assert run_job(job_id, settings=backend) == "failed"
    text = shown(backend, job_id)
    assert "…/shard-00001.bin" in text and str(backend.data_dir) not in text, text


def test_a_stored_dataset_missing_before_the_start_names_the_file(backend):
    job_id = submit(backend)
    for path in (backend.artifacts_dir / "datasets").iterdir():
        path.unlink()
    assert run_job(job_id, settings=backend) == "failed"
    with session_scope(backend.sqlalchemy_url) as session:
        error = session.get(Job, job_id).error
    assert error["code"] == "file_not_found" and error["param"] == "training_file"
    assert str(backend.data_dir) not in error["message"]
