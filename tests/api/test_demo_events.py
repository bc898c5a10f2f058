"""The demo's event reader sees every event, however many arrive between two polls
(issue 10, item 9): it pages back with `after` through the API, with the openai SDK."""

from __future__ import annotations

import openai

from app.cli.demo import new_events
from app.db.session import session_scope
from app.jobs.service import add_event
from tests.factories import submit


def add_events(settings, job_id: str, first: int, count: int) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        for number in range(first, first + count):
            add_event(session, job_id=job_id, message=f"event {number}")


def test_every_event_is_read_once_in_order(client, settings) -> None:
    job_id = submit(settings)  # organization acme, the client's
    sdk = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=client.headers["Authorization"].removeprefix("Bearer "),
        http_client=client,
    )
    before = new_events(sdk, job_id, None)  # what job creation wrote
    assert before and "event" not in before[-1].message
    add_events(settings, job_id, 1, 45)  # more than two pages of 20 between two polls
    batch = new_events(sdk, job_id, before[-1].id)
    assert [e.message for e in batch] == [f"event {n}" for n in range(1, 46)]
    add_events(settings, job_id, 46, 3)
    later = new_events(sdk, job_id, batch[-1].id)
    assert [e.message for e in later] == ["event 46", "event 47", "event 48"]
    assert new_events(sdk, job_id, later[-1].id) == []
    assert len(new_events(sdk, job_id, None)) == len(before) + 48
