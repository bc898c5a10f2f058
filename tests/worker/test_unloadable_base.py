"""A job whose base model stopped being loadable fails at once, naming the model and why."""

from __future__ import annotations

from app.db.models import Job
from tests.conftest import make_settings
from tests.factories import load, submit
from worker.run_job import run_job


def test_a_job_on_a_base_that_cannot_load_fails_naming_it(settings, tmp_path, tiny_model_dir):
    job_id = submit(settings)
    # The allowlist changed between creation and the run: the entry now has a typo.
    moved = make_settings(
        settings.data_dir, tiny_model_dir, base_models={"tiny": str(tmp_path / "tinyy")}
    )
    assert run_job(job_id, settings=moved) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "model_not_available" and job.error["param"] == "model"
    assert "base model 'tiny' cannot be loaded" in job.error["message"]
    assert "tinyy is not a directory" in job.error["message"]
