"""Issue 14 #10: a job that trains DoRA or LoRA on the embeddings succeeds, and its adapter
answers through the API like any other (the PEFT fallback), instead of 400 "not served"."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db.models import Job
from app.db.session import session_scope
from tests.api.conftest import api_key, enqueued  # noqa: F401 (fixture)
from tests.factories import api_app, submit
from worker.run_job import run_job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "hyperparameters",
    [{"use_dora": True}, {"lora_target_modules": ["embed_tokens"]}],
    ids=["dora", "embed_tokens"],
)
def test_what_the_trainer_makes_is_served(settings, enqueued, hyperparameters):  # noqa: ARG001, F811
    job_id = submit(settings, n_epochs=1, **hyperparameters)
    assert run_job(job_id, settings=settings) == "succeeded"
    with session_scope(settings.sqlalchemy_url) as session:
        model = session.get(Job, job_id).fine_tuned_model
    app = api_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        body = {"model": model, "prompt": "code for item 1?", "max_tokens": 4, "temperature": 0}
        whole = client.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = client.post("/v1/completions", json=body | {"stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
