"""Pause and resume through the API (docs/design.md 4.16): a queued job is held at once, a
running one is flagged; both are idempotent, a finished job answers 409, cancel ends a
paused job, and resume queues it again and sends its wake-up message."""

from __future__ import annotations

import pytest

from app.db.models import Job
from app.db.session import session_scope
from tests.factories import create_job


def post(client, job_id: str, action: str):
    return client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")


def set_status(settings, job_id: str, status: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).status = status


def messages(client, job_id: str) -> list[str]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    return [event["message"] for event in events]


def test_a_queued_job_is_held_then_resumed_and_sent_again(client, training_file, enqueued):
    job = create_job(client, model="tiny", training_file=training_file).json()
    for _ in range(2):  # idempotent
        paused = post(client, job["id"], "pause")
        assert paused.status_code == 200 and paused.json()["status"] == "paused", paused.text
    assert messages(client, job["id"]).count("Fine-tuning job paused before it started") == 1
    enqueued.clear()
    for _ in range(2):
        resumed = post(client, job["id"], "resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert enqueued[0] == job["id"]
    assert messages(client, job["id"]).count("Fine-tuning job resumed") == 1


def test_a_running_job_is_asked_to_pause_and_the_ask_can_be_withdrawn(
    client, settings, training_file
):
    job = create_job(client, model="tiny", training_file=training_file).json()
    set_status(settings, job["id"], "running")
    for _ in range(2):
        answer = post(client, job["id"], "pause")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.get(Job, job["id"]).pause_requested
    assert post(client, job["id"], "resume").json()["status"] == "running"
    with session_scope(settings.sqlalchemy_url) as session:
        assert not session.get(Job, job["id"]).pause_requested
    assert messages(client, job["id"])[0] == "Pause withdrawn; the job keeps running"


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_finished_job_cannot_be_paused_or_resumed(client, settings, training_file, status):
    job = create_job(client, model="tiny", training_file=training_file).json()
    set_status(settings, job["id"], status)
    for action in ("pause", "resume"):
        response = post(client, job["id"], action)
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_state" and status in error["message"]


def test_a_paused_job_is_cancelled_at_once(client, training_file):
    job = create_job(client, model="tiny", training_file=training_file).json()
    post(client, job["id"], "pause")
    cancelled = post(client, job["id"], "cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert post(client, job["id"], "resume").status_code == 409


def test_another_organizations_job_is_not_found(client, other_client, training_file):
    job = create_job(client, model="tiny", training_file=training_file).json()
    for action in ("pause", "resume"):
        assert post(other_client, job["id"], action).status_code == 404


def test_a_paused_job_counts_against_the_active_job_quota(client, settings, training_file):
    settings.max_active_jobs = 1
    job = create_job(client, model="tiny", training_file=training_file).json()
    post(client, job["id"], "pause")
    second = create_job(client, model="tiny", training_file=training_file)
    assert second.status_code == 429 and "paused" in second.json()["error"]["message"]
