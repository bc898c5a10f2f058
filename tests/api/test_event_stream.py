"""GET …/events?stream=true: Server-Sent Events, oldest first, resumable, ending with the job.

Streams are read over real uvicorn (a thread of this process): the test client buffers a
whole response, and a live stream ends only when its job does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app import tenancy
from app.db.session import get_engine, session_scope
from app.jobs import event_feed
from app.jobs import service as jobs
from tests.e2e.stack import serving
from tests.factories import uploaded_file


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_feed, "POLL_SECONDS", 0.05)


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as base_url:
        yield base_url


def new_job(client) -> str:
    body = {"model": "tiny", "training_file": uploaded_file(client, 3)}
    return client.post("/v1/fine_tuning/jobs", json=body).json()["id"]


def sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The events of an SSE body (pings and comments skipped): {"event", "id", "data"}."""
    fields: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield {"event": fields.get("event", "message"), "id": fields.get("id")} | {
                    "data": json.loads(fields["data"])
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


def stream(base_url: str, client, job_id: str, **headers: str) -> Iterator[dict[str, Any]]:
    url = f"{base_url}/v1/fine_tuning/jobs/{job_id}/events"
    auth = {"Authorization": client.headers["Authorization"]} | headers
    with httpx.stream("GET", url, params={"stream": "true"}, headers=auth, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield from sse(r.iter_lines())


def listed(client, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job as the JSON list gives it, oldest first."""
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return page["data"][::-1]


def test_events_arrive_in_order_as_written_and_the_stream_ends_with_the_job(
    client, settings, server
) -> None:
    job_id = new_job(client)
    received: list[dict[str, Any]] = []

    def write_then_cancel() -> None:
        for step in range(5):
            while len(received) < step + 1:  # written while the stream is open and waiting
                time.sleep(0.02)
            with session_scope(settings.sqlalchemy_url) as session:
                jobs.add_event(session, job_id=job_id, message=f"step {step}")
        auth = {"Authorization": client.headers["Authorization"]}
        httpx.post(f"{server}/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth, timeout=10)

    writer = threading.Thread(target=write_then_cancel, daemon=True)
    writer.start()
    for event in stream(server, client, job_id):
        received.append(event)
    writer.join(timeout=10)
    *events, end = received
    assert end["event"] == "end" and end["id"] is None
    assert end["data"]["id"] == job_id and end["data"]["status"] == "cancelled"
    assert [e["data"] for e in events] == listed(client, job_id)  # every event, once, in order
    assert [e["id"] for e in events] == [e["data"]["id"] for e in events]
    assert [e["data"]["message"] for e in events[1:6]] == [f"step {i}" for i in range(5)]


def test_last_event_id_resumes_after_that_event_without_duplicates(
    client, settings, server
) -> None:
    job_id = new_job(client)
    with session_scope(settings.sqlalchemy_url) as session:
        for step in range(6):
            jobs.add_event(session, job_id=job_id, message=f"step {step}")
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    everything = listed(client, job_id)
    resumed = list(stream(server, client, job_id, **{"Last-Event-ID": everything[3]["id"]}))
    assert [e["data"] for e in resumed[:-1]] == everything[4:]
    assert resumed[-1]["event"] == "end"


def test_a_stream_holds_no_database_connection_between_polls(
    client, server, settings, monkeypatch
) -> None:
    job_id = new_job(client)
    pool = get_engine(settings.sqlalchemy_url).pool
    checked_out_after_poll: list[int] = []
    real_poll = event_feed.poll

    def recorded_poll(*args: Any, **kwargs: Any) -> event_feed.Poll:
        result = real_poll(*args, **kwargs)
        checked_out_after_poll.append(pool.checkedout())
        return result

    monkeypatch.setattr(event_feed, "poll", recorded_poll)
    events = stream(server, client, job_id)
    assert next(events)["data"]["message"].startswith("Created")
    deadline = time.monotonic() + 10
    while len(checked_out_after_poll) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checked_out_after_poll[:5] == [0] * 5  # each poll gave its connection back
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert list(events)[-1]["event"] == "end"


def test_a_foreign_job_or_event_id_is_refused_before_any_stream(
    client, other_client, server
) -> None:
    mine, theirs = new_job(client), new_job(other_client)
    foreign_event = listed(other_client, theirs)[0]["id"]
    url = f"{server}/v1/fine_tuning/jobs/{{}}/events"
    auth = {"Authorization": client.headers["Authorization"]}
    cases = [
        (theirs, {}, 404, None),
        (mine, {"Last-Event-ID": foreign_event}, 404, "Last-Event-ID"),
        (mine, {"Last-Event-ID": "not-an-event"}, 400, "Last-Event-ID"),
    ]
    for job_id, headers, status, param in cases:
        response = httpx.get(
            url.format(job_id), params={"stream": "true"}, headers=auth | headers, timeout=10
        )
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param or param is None


def test_a_stream_ends_with_an_error_event_once_its_key_is_revoked(
    client, settings, server
) -> None:
    settings.stream_key_check_seconds = 0.1
    job_id = new_job(client)
    events = stream(server, client, job_id)
    assert next(events)["event"] == "message"
    with session_scope(settings.sqlalchemy_url) as session:
        key_id = tenancy.list_api_keys(session, organization="acme")[0][0].id
        tenancy.revoke_key(session, key_id=key_id)
    (last,) = list(events)
    assert last["event"] == "error" and last["data"]["error"]["code"] == "invalid_api_key"


def test_a_stream_lasts_at_most_its_bound_and_resumes_where_it_stopped(
    client, settings, server, monkeypatch
) -> None:
    monkeypatch.setattr(event_feed, "STREAM_MAX_SECONDS", 0.3)
    job_id = new_job(client)
    first = list(stream(server, client, job_id))  # the job is still queued: no end event
    assert [e["event"] for e in first] == ["message"]
    with session_scope(settings.sqlalchemy_url) as session:
        jobs.add_event(session, job_id=job_id, message="later")
    again = list(stream(server, client, job_id, **{"Last-Event-ID": first[-1]["id"]}))
    assert [e["data"]["message"] for e in again] == ["later"]
