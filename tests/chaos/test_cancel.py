"""Issue 5, fault 5: cancelling running and queued jobs, also across a worker crash.

Cancel is a flag in the database: a queued job is cancelled at once and its message,
when it arrives, finds nothing to claim; a running job stops at its next step; a job
whose worker died with the flag set is ended `cancelled` by the sweep. Nothing is
published for any of them.
"""

from __future__ import annotations

import statistics
import time

import pytest

from tests.chaos.harness import FULL, wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

JOB = {"n_epochs": 2, "batch_size": 2}  # 16 examples: 16 steps, a checkpoint at step 8
N_RUNNING, N_QUEUED = (10, 10) if FULL else (1, 1)
N_AFTER_CRASH = 5 if FULL else 1


def cancel(stack, job_id: str) -> dict:
    response = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    return response.json()


def wait_training(stack, job_id: str) -> None:
    wait_until(lambda: stack.last_step(job_id) >= 1, 120, f"{job_id} to train", stack.logs)


def assert_nothing_published(stack, ids: list[str]) -> None:
    assert stack.adapters(ids) == []
    adapters_dir = stack.tmp / "data" / "artifacts" / "adapters"
    assert not any((adapters_dir / job_id).exists() for job_id in ids)
    for job in stack.jobs(ids).values():
        assert (job.status, job.fine_tuned_model) == ("cancelled", None)


def test_cancelled_jobs_stop_publish_nothing_and_queued_ones_never_start(make_stack):
    stack = make_stack(LORAFORGE_CHAOS_STEP_SLEEP="0.3")
    worker = stack.add_worker("w1")
    file_id = stack.upload(chat_rows(16))
    running = stack.submit(file_id, N_RUNNING, **JOB)
    queued = stack.submit(file_id, N_QUEUED, **JOB)
    for job_id in queued:  # behind the running ones: cancelled before any worker sees them
        assert cancel(stack, job_id)["status"] == "cancelled"
    stop_seconds = []
    for job_id in running:  # one worker: each runs in turn and is cancelled mid-training
        wait_training(stack, job_id)
        asked = time.monotonic()
        assert cancel(stack, job_id)["status"] == "running"  # it stops at its next step
        stack.wait_terminal([job_id], 60)
        stop_seconds.append(time.monotonic() - asked)

    # Then a crash: the worker dies mid-training, both kinds are cancelled while no
    # worker runs, and a restarted worker must not start any of them.
    crashed = stack.submit(file_id, N_AFTER_CRASH, **JOB)
    later = stack.submit(file_id, N_AFTER_CRASH, **JOB)
    wait_training(stack, crashed[0])
    worker.kill_master()
    for job_id in crashed + later:
        cancel(stack, job_id)
    worker.start()
    stack.wait_terminal(crashed + later, 120)

    every = running + queued + crashed + later
    print(
        f"\ncancel: {len(every)} jobs cancelled; a running job stopped "
        f"{statistics.median(stop_seconds):.2f}s (median), {max(stop_seconds):.2f}s (max) "
        f"after the request"
    )
    assert_nothing_published(stack, every)
    never_started = queued + later + crashed[1:]
    stepped = {entry["job"] for entry in stack.journal("step")}
    for job in stack.jobs(never_started).values():
        assert (job.attempt, job.started_at, job.id in stepped) == (0, None, False)
    # cancel is idempotent: the same answer again, nothing changes
    for job_id in (running[0], queued[0], crashed[0]):
        before = stack.http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert cancel(stack, job_id) == before

    if not FULL:  # the in-process API tests check 409 after success on every run
        return
    # and a job that succeeded cannot be cancelled: 409, the adapter stays
    [done] = stack.submit(stack.upload(chat_rows(4)), 1, n_epochs=1, batch_size=2)
    assert stack.wait_terminal([done], 120)[done].status == "succeeded"
    response = stack.http.post(f"/v1/fine_tuning/jobs/{done}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "invalid_request_error"
    job = stack.http.get(f"/v1/fine_tuning/jobs/{done}").json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"]
    assert len(stack.adapters([done])) == 1
