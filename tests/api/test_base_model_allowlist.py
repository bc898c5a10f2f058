"""A typo'd base-model path, or a hub id on an offline machine (issue 10, defect 2).

The user set `LORAFORGE_BASE_MODELS="tiny=…,typo=models/tinyy"`: the typo was listed,
job creation answered 200, and chat answered 500 after ~25 s of hub retries. Now the
entry is reported at start, left out of /v1/models, refused at job creation (400) and
answered 503 at once, each naming the model and the reason, and nothing reaches the hub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import api_app, job_count, publish_adapter, uploaded_file


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hub request fails the test: a path must never become a hub lookup."""
    import huggingface_hub
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import


@pytest.fixture
def client(tmp_path, tiny_model_dir, enqueued, no_hub, caplog):  # noqa: ARG001
    from app import migrate

    models = {
        "tiny": str(tiny_model_dir),
        "typo": str(tiny_model_dir.parent / "tinyy"),  # the user's typo: no such directory
        "dotted": "./models/tinyy",
        "hub": "some-org/uncached-model",  # a hub id, not cached, on an offline machine
    }
    settings = make_settings(tmp_path / "data", tiny_model_dir, base_models=models)
    migrate.upgrade(settings)
    app = api_app(settings)
    with caplog.at_level(logging.ERROR), TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        test_client.settings = settings
        yield test_client


def test_each_bad_entry_is_reported_at_start(client, caplog):  # noqa: ARG001
    records = caplog.get_records("setup")  # the app started in the fixture
    logged = "\n".join(r.getMessage() for r in records if r.levelno >= logging.ERROR)
    assert "'typo'" in logged and "tinyy is not a directory" in logged
    assert "'dotted'" in logged and "'hub'" in logged and "HF_HUB_OFFLINE" in logged
    assert "'tiny'" not in logged


def test_models_list_only_usable_bases(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny"]
    retrieved = client.get("/v1/models/typo")
    assert retrieved.status_code == 503 and "typo" in retrieved.json()["error"]["message"]


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("typo", "tinyy is not a directory"),
        ("dotted", "it is a local path"),
        ("hub", "not in the hub cache"),
    ],
)
def test_job_on_an_unloadable_base_is_refused_naming_it(client, model, reason):
    file_id = uploaded_file(client, 4)
    response = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_available"
    assert f"base model {model!r} cannot be loaded" in error["message"]
    assert reason in error["message"] and "LORAFORGE_BASE_MODELS" in error["message"]
    assert job_count(client.settings) == 0


@pytest.mark.parametrize("model", ["typo", "dotted", "hub"])
def test_inference_on_an_unloadable_base_is_503_naming_it(client, model):
    response = client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_available" and error["param"] == "model"
    assert f"base model {model!r} cannot be loaded" in error["message"]


def test_the_usable_base_still_serves(client):
    response = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code == 200, response.text


def test_offline_environment_is_read_by_a_fresh_process(tmp_path, tiny_model_dir):
    """The real switch, HF_HUB_OFFLINE=1 with an empty HF_HOME, in a new process."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from app.base_models import unavailable; import json; print(json.dumps(unavailable("
        f"{{'tiny': {str(tiny_model_dir)!r}, 'hub': 'some-org/uncached-model'}})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert '"hub"' in result.stdout and "HF_HUB_OFFLINE" in result.stdout
    assert '"tiny"' not in result.stdout


@pytest.mark.usefixtures("enqueued", "no_hub")
def test_preloading_adapters_of_an_unloadable_base_keeps_the_api_up(
    settings, tiny_model_dir, tmp_path, caplog
):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="s", seed=1)
    broken = settings.model_copy(
        update={"base_models": {"tiny": str(tmp_path / "moved")}, "preload_adapters": [adapter]}
    )
    app = api_app(broken)
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert client.get("/health").status_code == 200
        client.headers["Authorization"] = f"Bearer {api_key(broken, 'acme')}"
        response = client.post(
            "/v1/completions", json={"model": adapter, "prompt": "hi", "max_tokens": 2}
        )
    assert response.status_code == 503, response.text
    assert "base model 'tiny' cannot be loaded" in response.json()["error"]["message"]
    assert any("moved is not a directory" in r.getMessage() for r in caplog.records)
