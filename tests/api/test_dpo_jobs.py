"""DPO jobs through the API: OpenAI's `method={"type": "dpo", …}` and preference files."""

from __future__ import annotations

import pytest

from tests.factories import create_job, jsonl, preference_rows, upload, uploaded_file


@pytest.fixture
def preference_file(client) -> str:
    response = upload(client, jsonl(preference_rows(20)), name="prefs.jsonl")
    assert response.status_code == 200, response.text
    return response.json()["id"]


def dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_dpo_job_resolves_beta_and_shows_its_method(client, preference_file) -> None:
    body = {"model": "tiny", "training_file": preference_file, "method": dpo(n_epochs=2)}
    job = create_job(client, **body).json()
    hp = job["hyperparameters"]
    assert hp["beta"] == 0.1 and hp["n_epochs"] == 2  # "auto" beta: DPO's usual 0.1
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": hp}}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"] == job["method"]


def test_dpo_job_keeps_a_given_beta(client, preference_file) -> None:
    job = create_job(
        client, model="tiny", training_file=preference_file, method=dpo(beta=0.5, lora_r=4)
    ).json()
    assert job["hyperparameters"]["beta"] == 0.5 and job["hyperparameters"]["lora_r"] == 4


@pytest.mark.parametrize(
    ("method", "param"),
    [
        (dpo(betta=0.2), "method.dpo.hyperparameters.betta"),
        (dpo(beta=0), "method.dpo.hyperparameters.beta"),
        (dpo(beta=2.5), "method.dpo.hyperparameters.beta"),
        ({"type": "dpo", "supervised": {}}, "method"),
        ({"type": "reinforcement"}, "method.type"),
    ],
)
def test_bad_dpo_settings_are_refused_by_name(client, preference_file, method, param) -> None:
    response = create_job(client, model="tiny", training_file=preference_file, method=method)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_dpo_job_on_chat_data_is_refused_naming_the_file(client) -> None:
    chat = uploaded_file(client, 5)
    response = create_job(client, model="tiny", training_file=chat, method=dpo())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "training_file" and chat in error["message"]
    assert "preference" in error["message"]


def test_a_supervised_job_on_preference_data_is_refused(client, preference_file) -> None:
    chat = uploaded_file(client, 5)
    for body in (
        {"training_file": preference_file},
        {"training_file": chat, "validation_file": preference_file},
    ):
        response = create_job(client, model="tiny", **body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert preference_file in error["message"] and "dpo" in error["message"]
        assert error["param"] == (
            "validation_file" if "validation_file" in body else "training_file"
        )


def test_a_bad_preference_line_is_named_and_nothing_stored(client) -> None:
    rows = preference_rows(3)
    rows[1]["non_preferred_output"] = [{"role": "user", "content": "hi"}]
    response = upload(client, jsonl(rows), name="prefs.jsonl")
    assert response.status_code == 400
    assert "line 2" in response.json()["error"]["message"]
    assert "non_preferred_output[0].role" in response.json()["error"]["message"]
    assert client.get("/v1/files").json()["data"] == []
