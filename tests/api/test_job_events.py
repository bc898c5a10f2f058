"""Event ids are opaque: they do not count every tenant's events, and `after` pages exactly."""

from __future__ import annotations

import re

from app.db.session import session_scope
from app.jobs import service as jobs
from tests.factories import uploaded_file

OPAQUE = re.compile(r"^ftevent-[A-Za-z0-9]{24}$")


def new_job(client) -> str:
    file_id = uploaded_file(client, 3)
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]


def event_ids(client, job_id: str, **params) -> list[str]:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
    assert response.status_code == 200, response.text
    return [event["id"] for event in response.json()["data"]]


def test_event_ids_do_not_reveal_other_tenants_activity(client, other_client) -> None:
    mine = new_job(other_client)
    for _ in range(3):  # another organization's activity between two of my events
        new_job(client)
    later = new_job(other_client)
    first, second = event_ids(other_client, mine)[0], event_ids(other_client, later)[0]
    assert OPAQUE.match(first) and OPAQUE.match(second), (first, second)
    assert not first[len("ftevent-") :].isdigit() and first != second


def test_after_pages_through_every_event_once_in_order(client, settings) -> None:
    job_id = new_job(client)
    with session_scope(settings.sqlalchemy_url) as session:
        for i in range(24):
            jobs.add_event(session, job_id=job_id, message=f"step {i}")
    everything = event_ids(client, job_id, limit=100)
    assert len(everything) == 25 and len(set(everything)) == 25
    paged, after = [], None
    while True:
        page = event_ids(client, job_id, limit=7, **({"after": after} if after else {}))
        if not page:
            break
        paged += page
        after = page[-1]
    assert paged == everything


def test_an_unknown_or_foreign_event_cursor_is_404(client, other_client) -> None:
    mine, theirs = new_job(client), new_job(other_client)
    foreign = event_ids(other_client, theirs)[0]
    for after in (foreign, "ftevent-" + "Z" * 24):
        response = client.get(f"/v1/fine_tuning/jobs/{mine}/events", params={"after": after})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["param"] == "after"
