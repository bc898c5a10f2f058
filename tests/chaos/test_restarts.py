"""Issue 5, fault 4: Redis and PostgreSQL restart under a running system.

Redis runs without persistence, so killing it loses every message: queued jobs survive
only because the sweep re-sends what the database says is queued. PostgreSQL is a
throwaway cluster of the test's own, stopped (`pg_ctl stop -m fast`) and started again
during a burst of submissions.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from tests.chaos.harness import FULL, assert_never_two_attempts_at_once, wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

JOB = {"n_epochs": 1, "batch_size": 2}  # 8 examples: 4 steps


def test_jobs_survive_a_redis_restart_that_loses_every_message(make_stack, redis_server):
    stack = make_stack(LORAFORGE_CHAOS_STEP_SLEEP="0.3")
    stack.add_worker("w1")
    file_id = stack.upload(chat_rows(8))
    ids = stack.submit(file_id, 12 if FULL else 2, **JOB)
    wait_until(lambda: stack.last_step(ids[0]) >= 1, 120, "the first job to train", stack.logs)

    redis_server.kill()
    statuses: Counter[int] = Counter()
    outage_ids: list[str] = []
    deadline = time.monotonic() + (5 if FULL else 2)
    while time.monotonic() < deadline:
        for path in (
            f"/v1/fine_tuning/jobs/{ids[-1]}",
            "/v1/fine_tuning/jobs",
            f"/v1/fine_tuning/jobs/{ids[0]}/events",
            "/v1/files",
        ):
            response = stack.http.get(path)
            assert response.status_code == 200, response.text  # reads come from SQL
        response = stack.create_job(file_id, **JOB)
        statuses[response.status_code] += 1
        if response.status_code == 503:
            assert "Retry-After" in response.headers
        else:  # the row is committed; the sweep sends the message once Redis is back
            assert response.status_code in (200, 202), response.text
            assert response.json()["status"] == "queued"
            outage_ids.append(response.json()["id"])
        time.sleep(0.5)
    redis_server.start()  # the same port, empty: every message is gone
    restarted = time.monotonic()
    jobs = stack.wait_terminal(ids + outage_ids, 240 if FULL else 150)
    recovery = time.monotonic() - restarted

    print(
        f"\nredis outage: create answered {dict(statuses)}; "
        f"{len(ids)} + {len(outage_ids)} jobs finished {recovery:.1f}s after the restart: "
        f"{Counter(job.status for job in jobs.values())}"
    )
    assert all(job.status == "succeeded" for job in jobs.values())
    assert sorted(a.job_id for a in stack.adapters(jobs)) == sorted(jobs)  # one adapter each
    assert_never_two_attempts_at_once(stack)


def test_no_job_is_lost_or_duplicated_when_postgres_restarts_during_a_burst(make_stack, pg_cluster):
    stack = make_stack(
        db_url=pg_cluster.create_database(f"chaos_{uuid.uuid4().hex[:8]}"),
        LORAFORGE_CHAOS_STEP_SLEEP="0.2",
    )
    stack.add_worker("w1")
    stack.add_worker("w2")
    file_id = stack.upload(chat_rows(8))
    first = stack.submit(file_id, 2, **JOB)
    wait_until(lambda: stack.last_step(first[0]) >= 1, 120, "a job to train", stack.logs)

    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def burst() -> None:
        while not stop.is_set():
            try:
                response = stack.create_job(file_id, **JOB)
                created = response.json().get("id") if response.status_code == 200 else None
                answers.append((response.status_code, created))
            except httpx.HTTPError as exc:
                answers.append((0, type(exc).__name__))
            time.sleep(1 / 3 if FULL else 1 / 2)

    submitter = threading.Thread(target=burst)
    submitter.start()
    time.sleep(1.5 if FULL else 0.7)
    pg_cluster.restart(down_seconds=3 if FULL else 2)
    time.sleep(5 if FULL else 0.7)
    stop.set()
    submitter.join()

    # while the database is down the API answers 503 + Retry-After (or the socket fails), never 500
    assert {status for status, _ in answers} <= {0, 200, 503}, Counter(s for s, _ in answers)
    created = [job_id for status, job_id in answers if status == 200]
    jobs = stack.wait_terminal(first + created, 300 if FULL else 180)
    print(
        f"\npostgres restart during a burst: answers {dict(Counter(s for s, _ in answers))}; "
        f"{len(first) + len(created)} jobs: {Counter(job.status for job in jobs.values())}, "
        f"attempts {sorted(Counter(job.attempt for job in jobs.values()).items())}"
    )
    all_rows = stack.jobs_of_org()
    assert sorted(all_rows) == sorted(first + created)  # nothing created behind an error
    assert len(created) == len(set(created))
    assert all(job.status == "succeeded" for job in jobs.values()), {
        job.id: (job.status, job.error) for job in jobs.values() if job.status != "succeeded"
    }
    assert sorted(a.job_id for a in stack.adapters(jobs)) == sorted(jobs)
    assert_never_two_attempts_at_once(stack)
