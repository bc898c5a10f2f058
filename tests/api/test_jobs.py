from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db.models import Job
from app.db.session import session_scope
from tests.factories import create_job, job_count


def test_create_resolves_auto_and_enqueues_after_commit(
    client, settings, training_file, monkeypatch
):
    from app.jobs import queue

    seen_in_db: list[str] = []

    # the row must be committed when the message leaves
    def enqueue(job_id: str, queue: str = "training") -> bool:  # noqa: ARG001
        with session_scope(settings.sqlalchemy_url) as session:
            seen_in_db.append(session.scalar(select(Job.status).where(Job.id == job_id)))
        return True

    monkeypatch.setattr(queue, "enqueue_training", enqueue)
    response = create_job(
        client, model="tiny", training_file=training_file, suffix="my-model", seed=7
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and seen_in_db == ["queued"]
    assert job["seed"] == 7 and job["suffix"] == "my-model" and job["fine_tuned_model"] is None
    hp = job["hyperparameters"]
    # every "auto" resolved but the memory knobs, which the worker plans on its device
    memory = {"gradient_checkpointing", "gradient_accumulation_steps"}
    assert {k for k, v in hp.items() if v == "auto"} == memory
    assert hp["n_epochs"] == 4 and hp["batch_size"] == 3 and hp["learning_rate_multiplier"] == 1.0
    assert hp["lora_target_modules"] == "all-linear" and hp["lora_alpha"] == 2 * hp["lora_r"]
    assert job["method"]["supervised"]["hyperparameters"] == hp


def test_hyperparameters_under_method_supervised(client, training_file):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "lora_r": 4}}}
    job = create_job(client, model="tiny", training_file=training_file, method=method).json()
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["lora_r"] == 4


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        (
            {"hyperparameters": {"n_epochs": 2, "epochz": 3}},
            "hyperparameters.epochz",
            "Unrecognized",
        ),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "Invalid value"),
        ({"hyperparameters": {"batch_size": 1000}}, "hyperparameters.batch_size", "Invalid value"),
        (
            {"hyperparameters": {"lora_dropout": 1.5}},
            "hyperparameters.lora_dropout",
            "Invalid value",
        ),
        (
            {"hyperparameters": {"learning_rate_multiplier": -1}},
            "hyperparameters.learning_rate_multiplier",
            "Invalid",
        ),
        (
            {"hyperparameters": {"lora_target_modules": []}},
            "hyperparameters.lora_target_modules",
            "Invalid",
        ),
        ({"suffix": "../../etc"}, "suffix", "Invalid value"),
        ({"seed": -1}, "seed", "Invalid value"),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": ""}}]},
            "integrations.0.wandb.project",
            "Invalid value",
        ),
        (  # credentials come from the worker's environment, never from a request
            {"integrations": [{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}]},
            "integrations.0.wandb.api_key",
            "Unrecognized",
        ),
        ({"integrations": [{"type": "wandb"}]}, "integrations.0.wandb", "Missing"),
        ({"integrations": [{"type": "comet"}]}, "integrations.0", "'wandb' or 'mlflow'"),
        (
            {"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "http://10.0.0.1"}}]},
            "integrations.0.mlflow.tracking_uri",
            "not one this server allows",
        ),
        ({"model": "gpt-4o"}, "model", "not an allowed base model"),
        ({"training_file": "file-doesnotexist"}, "training_file", "does not exist"),
        ({"validation_file": "file-nope"}, "validation_file", "does not exist"),
    ],
)
def test_bad_job_requests_name_the_field_and_store_nothing(
    client, settings, training_file, body, param, phrase
):
    response = create_job(client, **({"model": "tiny", "training_file": training_file} | body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and phrase in error["message"]
    assert job_count(settings) == 0


def test_hyperparameters_in_two_places_is_refused(client, training_file):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    response = create_job(
        client,
        model="tiny",
        training_file=training_file,
        method=method,
        hyperparameters={"n_epochs": 3},
    )
    assert response.status_code == 400 and "not both" in response.json()["error"]["message"]


def test_list_paginates_newest_first(client, training_file):
    ids = [
        create_job(client, model="tiny", training_file=training_file).json()["id"] for _ in range(5)
    ]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = client.get(
        "/v1/fine_tuning/jobs", params={"limit": 10, "after": first["data"][-1]["id"]}
    ).json()
    assert [job["id"] for job in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 0}).status_code == 400


def test_cancel_queued_is_immediate_and_idempotent(client, training_file):
    job = create_job(client, model="tiny", training_file=training_file).json()
    first = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    assert first.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    messages = [
        e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    ]
    assert messages[0] == "Fine-tuning job cancelled" and messages[-1].startswith(
        "Created fine-tuning job"
    )


def test_cancel_after_success_is_409(client, settings, training_file):
    job = create_job(client, model="tiny", training_file=training_file).json()
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job["id"]).status = "succeeded"
    response = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "invalid_state"


def test_events_and_checkpoints_pages(client, training_file):
    job = create_job(client, model="tiny", training_file=training_file).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["object"] == "list" and events["data"][0]["object"] == "fine_tuning.job.event"
    assert events["data"][0]["type"] == "message" and events["data"][0]["id"].startswith("ftevent-")
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert checkpoints == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
    bad_cursor = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": "x"})
    assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["param"] == "after"


def test_create_answers_202_when_the_broker_is_unreachable(
    client, settings, training_file, monkeypatch
):
    from app.jobs import queue

    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, queue=None: False)  # broker down
    response = create_job(client, model="tiny", training_file=training_file)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued" and job_count(settings) == 1  # the sweep sends it


def test_a_database_outage_answers_503_with_retry_after(client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from app.jobs import service as jobs

    def down(*_args, **_kwargs):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(jobs, "list_jobs", down)
    response = client.get("/v1/fine_tuning/jobs")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "service_unavailable"


def test_unknown_special_tokens_to_train_are_refused_at_creation(client, settings, training_file):
    hp = {"train_special_tokens": ["<|user|>", "<|im_start|>"]}
    response = create_job(client, model="tiny", training_file=training_file, hyperparameters=hp)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "hyperparameters.train_special_tokens"
    assert "<|im_start|>" in error["message"] and job_count(settings) == 0
    hp = {"train_special_tokens": True}
    created = create_job(client, model="tiny", training_file=training_file, hyperparameters=hp)
    assert created.json()["hyperparameters"]["train_special_tokens"] is True


def test_integrations_are_stored_and_shown_as_given(client, training_file):
    integrations = [
        {"type": "wandb", "wandb": {"project": "p", "entity": None, "tags": ["a", "b"]}},
        {"type": "mlflow", "mlflow": {"experiment_name": "e"}},  # the worker's tracking URI
    ]
    response = create_job(
        client, model="tiny", training_file=training_file, integrations=integrations
    )
    assert response.status_code == 200, response.text
    assert response.json()["integrations"] == integrations
    job = client.get(f"/v1/fine_tuning/jobs/{response.json()['id']}").json()
    assert job["integrations"] == integrations
