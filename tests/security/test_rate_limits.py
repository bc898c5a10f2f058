"""Per-organization request rate limit and active-job quota: 429 + Retry-After, others untouched."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app import migrate
from app.api.rate_limit import TokenBuckets
from app.jobs import service as jobs
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import api_app, job_count, uploaded_file


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_refuses_the_noisy_organization_only(app, client, other_client, settings):
    clock = FrozenClock()
    app.state.rate_limiter = TokenBuckets(clock=clock)
    settings.rate_limit_per_second, settings.rate_limit_burst = 20.0, 20
    noisy, quiet = [], []
    for _ in range(100):  # 100 requests within one (frozen) second against 20 req/s
        noisy.append(client.get("/v1/fine_tuning/jobs"))
        if len(quiet) < 15:
            quiet.append(other_client.get("/v1/files"))
    refused = [r for r in noisy if r.status_code == 429]
    assert len(refused) == 80 and all(r.status_code == 200 for r in noisy[:20])
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert [r.status_code for r in quiet] == [200] * 15  # the other organization is untouched
    clock.now += 1.0  # one second later the bucket has 20 tokens again
    assert client.get("/v1/fine_tuning/jobs").status_code == 200


def test_rate_limit_zero_disables_it(app, client, settings):
    app.state.rate_limiter = TokenBuckets(clock=FrozenClock())
    settings.rate_limit_per_second, settings.rate_limit_burst = 0, 1
    assert {client.get("/v1/files").status_code for _ in range(30)} == {200}


def test_active_job_quota_is_per_organization(client, other_client, settings):
    settings.max_active_jobs = 2
    mine = uploaded_file(client, 5)
    theirs = uploaded_file(other_client, 5)
    body = {"model": "tiny", "training_file": mine}
    first = [client.post("/v1/fine_tuning/jobs", json=body) for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    third = client.post("/v1/fine_tuning/jobs", json=body)
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert "2 queued, running or paused jobs" in third.json()["error"]["message"]
    assert job_count(settings) == 2  # nothing stored for the refused one
    other = other_client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": theirs}
    )
    assert other.status_code == 200
    client.post(f"/v1/fine_tuning/jobs/{first[0].json()['id']}/cancel")
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # a slot freed


def quota_race(settings, monkeypatch) -> list[int]:
    """20 concurrent creates of one organization against a quota of 5; their statuses."""
    settings.max_active_jobs, settings.rate_limit_per_second = 5, 0
    real_create = jobs.create_job

    def slow_create(*args, **kwargs):
        time.sleep(0.05)  # widen the window between the count and the insert, as load does
        return real_create(*args, **kwargs)

    monkeypatch.setattr(jobs, "create_job", slow_create)
    app = api_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        file_id = uploaded_file(client, 5)
        body = {"model": "tiny", "training_file": file_id}
        with ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(lambda _: client.post("/v1/fine_tuning/jobs", json=body), range(20))
            )
    return sorted(r.status_code for r in answers)


@pytest.mark.usefixtures("enqueued")  # no broker
def test_active_job_quota_holds_under_concurrency_sqlite(settings, monkeypatch):
    assert quota_race(settings, monkeypatch) == [200] * 5 + [429] * 15
    assert job_count(settings) == 5


@pytest.mark.postgres
@pytest.mark.usefixtures("enqueued")
def test_active_job_quota_holds_under_concurrency_postgres(
    tmp_path, tiny_model_dir, pg_database_url, monkeypatch
):
    settings = make_settings(tmp_path / "pg", tiny_model_dir, database_url=pg_database_url)
    migrate.upgrade(settings)
    assert quota_race(settings, monkeypatch) == [200] * 5 + [429] * 15
    assert job_count(settings) == 5
