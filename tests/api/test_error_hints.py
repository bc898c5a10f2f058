"""Errors a new user hits in the first hour name the fix (issue 10, defect 7)."""

from __future__ import annotations

import pytest

from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import api_app, stored_nothing, upload, uploaded_file

# What every "wrong shape" message shows: the three accepted line shapes.
SHAPES = ('{"messages": [', '{"prompt": "', '{"text": "')


def test_no_base_models_configured_names_the_setting(tmp_path, tiny_model_dir, enqueued):  # noqa: ARG001
    from fastapi.testclient import TestClient

    from app import migrate

    settings = make_settings(tmp_path / "data", tiny_model_dir, base_models={})
    migrate.upgrade(settings)
    app = api_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        file_id = uploaded_file(client, 4)
        response = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
        )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "LORAFORGE_BASE_MODELS" in message and "name=path-or-hub-id" in message
    assert "none configured" not in message


def test_every_unknown_hyperparameter_is_named(client):
    file_id = uploaded_file(client, 4)
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {"epochs": 3, "n_epochs": 2, "lr": 0.1, "rank": 4},
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for key in ("hyperparameters.epochs", "hyperparameters.lr", "hyperparameters.rank"):
        assert key in error["message"], error
    assert error["param"] == "hyperparameters.epochs"


def test_every_unknown_query_parameter_is_named(client):
    response = client.get("/v1/fine_tuning/jobs", params={"limt": 2, "aftr": "x"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "limt" in message and "aftr" in message


@pytest.mark.parametrize(
    ("content", "line", "phrase"),
    [
        # the parser stops at the single quote: column 10 of the user's second line
        (b'{"text": "a"}\n{"text": \'b\'}\n', 2, "column 10"),
        (b'{"text": "caf\xc3\xa9" "x"}\n', 1, "column 17"),  # columns count characters
        (b'{"text": "a",}\r\n', 1, "column 14"),
    ],
)
def test_json_syntax_error_gives_line_and_column(client, settings, content, line, phrase):
    response = upload(client, content)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"line {line}: invalid JSON") and phrase in message, message
    assert stored_nothing(settings)


@pytest.mark.parametrize(
    ("name", "content", "phrase"),
    [
        ("train.csv", b"prompt,completion\nhi,hello\n", ".jsonl"),
        ("train.jsonl", b"prompt,completion\nhi,hello\n", "looks like CSV"),
        ("train.jsonl", b"question\tanswer\nhi\thello\n", "looks like CSV"),
        ("train.jsonl", b'["hi", "hello"]\n', "got an array"),
        ("train.jsonl", b'"hi"\n', "got a string"),
        ("train.jsonl", b'{"input": "hi", "output": "hello"}\n', "got keys 'input', 'output'"),
    ],
)
def test_wrong_line_shape_shows_the_accepted_shapes(client, settings, name, content, phrase):
    response = upload(client, content, name=name)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert phrase in message, message
    assert all(shape in message for shape in SHAPES), message
    assert stored_nothing(settings)
