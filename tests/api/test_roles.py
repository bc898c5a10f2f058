"""Roles (docs/design.md §2.1): `serve` answers inference and nothing of the control plane;
`api` with LORAFORGE_INFERENCE_ENABLED=false refuses inference and loads no base model; a
job is sent to its base model's queue and says when no live worker consumes it; the admin
lists the workers seen."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli.main import cli
from app.db.base import utcnow
from app.db.session import session_scope
from app.jobs import queue, workers
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import PROMPT, api_app, create_job, uploaded_file

ADMIN = "adm-" + "r0les" * 7
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}


def signed_in(app, settings) -> TestClient:
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
    return client


@pytest.fixture
def serve(settings) -> Iterator[TestClient]:
    with signed_in(api_app(settings, role="serve"), settings) as client:
        yield client


@pytest.mark.usefixtures("one_torch_thread")
def test_serve_answers_inference_and_lists_what_it_serves(serve) -> None:
    response = serve.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    assert [m["id"] for m in serve.get("/v1/models").json()["data"]] == ["tiny"]
    assert serve.get("/v1/models/tiny").json()["id"] == "tiny"
    assert serve.get("/health").json() == {"status": "ok"}


def test_serve_has_no_control_plane_routes(serve) -> None:
    for method, path in [
        ("GET", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/admin/keys"),
        ("GET", "/v1/admin/workers"),
        ("GET", "/v1/webhooks"),
        ("GET", "/v1/models/tiny/adapter"),
        ("GET", "/ui/"),
    ]:
        response = serve.request(method, path)
        assert response.status_code == 404, (path, response.text)
        assert "error" in response.json(), path  # OpenAI's envelope, as on the api
    deleted = serve.delete("/v1/models/tiny")  # the route exists for GET only: refused
    assert deleted.status_code == 405 and "error" in deleted.json()


def test_inference_disabled_refuses_and_loads_no_model(settings, enqueued) -> None:  # noqa: ARG001
    off = make_settings(settings.data_dir, settings.base_models["tiny"], inference_enabled=False)
    app = api_app(off)
    with signed_in(app, off) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503, response.text
        assert "LORAFORGE_INFERENCE_ENABLED" in response.json()["error"]["message"]
        assert client.get("/v1/files").status_code == 200  # the control plane still answers
    assert app.state.engine is None  # no base model was loaded


def test_serve_refuses_to_start_with_inference_disabled(monkeypatch) -> None:
    from app.cli import main
    from app.config import get_settings

    started: list[str] = []
    monkeypatch.setattr(main, "_run_server", lambda factory, *_: started.append(factory))
    monkeypatch.setenv("LORAFORGE_INFERENCE_ENABLED", "false")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["serve"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "LORAFORGE_INFERENCE_ENABLED" in result.output
    assert started == []


@pytest.mark.parametrize(
    ("queues", "named"), [("webhooks,training", "worker of its own"), ("gpu 80g", "'gpu 80g'")]
)
def test_worker_refuses_bad_queues_naming_them(monkeypatch, queues: str, named: str) -> None:
    import os

    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("the worker was started"))
    result = CliRunner().invoke(cli, ["worker", "--queues", queues])
    assert result.exit_code == 2 and named in result.output


def test_up_runs_its_worker_on_every_routed_queue(settings) -> None:
    from app.cli.main import _every_training_queue

    routed = settings.model_copy(update={"model_queues": {"big": "gpu-80g", "tiny": "cpu"}})
    assert _every_training_queue(routed) == "training,gpu-80g,cpu"


@pytest.fixture
def routed_api(settings, monkeypatch) -> Iterator[tuple[TestClient, list[tuple[str, str]]]]:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, q: sent.append((job_id, q)))
    routed = make_settings(
        settings.data_dir,
        settings.base_models["tiny"],
        model_queues="tiny=gpu-80g",
        admin_key=ADMIN,
    )
    with signed_in(api_app(routed), routed) as client:
        yield client, sent


def job_events(client: TestClient, job_id: str) -> list[str]:
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    return [event["message"] for event in page["data"]]


def test_a_job_goes_to_its_queue_and_says_it_waits_for_a_worker(routed_api) -> None:
    client, sent = routed_api
    job = create_job(client, model="tiny", training_file=uploaded_file(client, 12)).json()
    assert sent == [(job["id"], "gpu-80g")]
    assert "waiting for a worker on queue gpu-80g" in job_events(client, job["id"])


def test_no_waiting_event_while_a_worker_consumes_the_queue(routed_api, settings) -> None:
    client, _ = routed_api
    with session_scope(settings.sqlalchemy_url) as session:
        workers.record_heartbeat(session, name="gpu:7", queues=["gpu-80g"], now=utcnow())
    job = create_job(client, model="tiny", training_file=uploaded_file(client, 12)).json()
    assert not any("waiting" in message for message in job_events(client, job["id"]))
    listed = client.get("/v1/admin/workers", headers={"Authorization": f"Bearer {ADMIN}"})
    assert listed.status_code == 200, listed.text
    (worker,) = listed.json()["data"]
    assert (worker["name"], worker["queues"], worker["live"]) == ("gpu:7", ["gpu-80g"], True)
    assert client.get("/v1/admin/workers").status_code == 403  # a tenant key: refused
