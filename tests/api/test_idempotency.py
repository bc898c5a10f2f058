"""Idempotency-Key on job and file creation: a replay returns the same object, never a second."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app import migrate
from app.db.models import File, Job
from app.db.session import session_scope
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import api_app, chat_rows, job_count, jsonl, stored_nothing, uploaded_file


def file_count(settings) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.scalar(select(func.count()).select_from(File))


def post_job(client, file_id: str, key: str | None, **extra):
    headers = {"Idempotency-Key": key} if key is not None else {}
    body = {"model": "tiny", "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


def keyed_upload(client, content: bytes, key: str):
    return client.post(
        "/v1/files",
        files={"file": ("train.jsonl", content)},
        data={"purpose": "fine-tune"},
        headers={"Idempotency-Key": key},
    )


def test_job_replay_returns_the_same_job_and_enqueues_once(client, settings, enqueued):
    file_id = uploaded_file(client, 5)
    first = post_job(client, file_id, "job-1", seed=3)
    replay = post_job(client, file_id, "job-1", seed=3)
    assert first.status_code == replay.status_code == 200
    assert replay.json()["id"] == first.json()["id"]
    assert job_count(settings) == 1 and enqueued == [first.json()["id"]]
    assert post_job(client, file_id, "job-2", seed=3).json()["id"] != first.json()["id"]
    assert post_job(client, file_id, None, seed=3).json()["id"] != first.json()["id"]


def test_job_key_reused_with_another_body_is_422_and_creates_nothing(client, settings):
    file_id = uploaded_file(client, 5)
    post_job(client, file_id, "job-1", seed=3)
    reused = post_job(client, file_id, "job-1", seed=4)
    assert reused.status_code == 422
    error = reused.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert job_count(settings) == 1


def test_keys_are_scoped_per_organization(client, other_client, settings):
    mine = uploaded_file(client, 5)
    theirs = uploaded_file(other_client, 5)
    a = post_job(client, mine, "shared-key")
    b = post_job(other_client, theirs, "shared-key")
    assert a.status_code == b.status_code == 200 and a.json()["id"] != b.json()["id"]
    assert a.json()["id"] not in b.text and job_count(settings) == 2


def test_file_replay_returns_the_same_file_and_stores_once(client, settings):
    content = jsonl(chat_rows(4))
    first = keyed_upload(client, content, "upload-1")
    replay = keyed_upload(client, content, "upload-1")
    assert first.status_code == replay.status_code == 200
    assert replay.json() == first.json() and file_count(settings) == 1
    assert len(list((settings.artifacts_dir / "datasets").iterdir())) == 1
    reused = keyed_upload(client, jsonl(chat_rows(5)), "upload-1")
    assert reused.status_code == 422 and file_count(settings) == 1
    assert len(list((settings.artifacts_dir / "datasets").iterdir())) == 1


def test_a_replay_after_the_file_was_deleted_is_409_saying_so(client, settings):
    content = jsonl(chat_rows(4))
    file_id = keyed_upload(client, content, "upload-1").json()["id"]
    assert client.delete(f"/v1/files/{file_id}").status_code == 200
    replay = keyed_upload(client, content, "upload-1")
    assert replay.status_code == 409, replay.text
    error = replay.json()["error"]
    assert error["code"] == "idempotent_object_deleted" and error["param"] == "Idempotency-Key"
    assert file_id in error["message"] and "deleted" in error["message"]
    assert file_count(settings) == 0  # nothing created in its place


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "caf\u00e9"])
def test_malformed_keys_are_refused_and_nothing_is_stored(client, settings, key):
    headers = {"Idempotency-Key": key.encode("utf-8")}
    response = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(chat_rows(2)))},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "Idempotency-Key"
    assert stored_nothing(settings)


def race(settings, enqueued_ids: list[str]) -> list[str]:
    """8 concurrent first requests with one key; returns the job ids they answered."""
    app = api_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        file_id = uploaded_file(client, 5)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post_job(client, file_id, "race"), range(8)))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1 and enqueued_ids == list(ids)
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    return list(ids)


def test_concurrent_first_requests_create_one_job_sqlite(settings, enqueued):
    race(settings, enqueued)


@pytest.mark.postgres
def test_concurrent_first_requests_create_one_job_postgres(
    tmp_path, tiny_model_dir, pg_database_url, enqueued
):
    settings = make_settings(tmp_path / "pg", tiny_model_dir, database_url=pg_database_url)
    migrate.upgrade(settings)
    race(settings, enqueued)
