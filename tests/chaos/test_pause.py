"""Issue 12 §3 on the real stack (PostgreSQL, Redis, a Celery worker), through the openai SDK:
a running job paused mid-training checkpoints and releases its worker, which takes the next
job; resumed, it ends with the same per-step losses as that job, the same request trained
without a pause."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import select

from app.db.models import JobEvent
from app.db.session import session_scope
from tests.chaos.harness import wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

JOB = {"n_epochs": 2, "batch_size": 2}  # 16 examples: 16 steps, a checkpoint at step 8


def losses(stack, job_id: str) -> list[tuple[int, float]]:
    with session_scope(stack.db_url) as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        )
        rows = sorted((e.seq, e.data["step"], e.data["train_loss"]) for e in events)
    return [(step, loss) for _, step, loss in rows]


def test_a_paused_job_frees_its_worker_and_resumes_to_the_same_losses(make_stack):
    stack = make_stack(LORAFORGE_CHAOS_STEP_SLEEP="0.2")
    stack.add_worker("w1")
    key = stack.http.headers["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    file_id = stack.upload(chat_rows(16))
    paused, other = stack.submit(file_id, 2, **JOB)  # the same request twice; one worker

    wait_until(lambda: stack.last_step(paused) >= 3, 120, "the job to train", stack.logs)
    assert client.fine_tuning.jobs.pause(paused).status == "running"  # stops at its next step
    wait_until(
        lambda: client.fine_tuning.jobs.retrieve(paused).status == "paused",
        60,
        "the job to pause",
        stack.logs,
    )
    assert client.fine_tuning.jobs.pause(paused).status == "paused"  # idempotent
    stack.wait_terminal([other], 120)  # the worker was free for the next job
    assert client.fine_tuning.jobs.retrieve(paused).status == "paused"  # held meanwhile
    checkpoints = client.fine_tuning.jobs.checkpoints.list(paused).data
    assert (
        checkpoints and checkpoints[0].step_number == stack.jobs([paused])[paused].steps_completed
    )

    assert client.fine_tuning.jobs.resume(paused).status == "queued"
    [job] = stack.wait_terminal([paused], 120).values()
    assert job.status == "succeeded" and job.pauses == 1

    steps, paused_losses = zip(*losses(stack, paused), strict=True)
    reference_steps, reference_losses = zip(*losses(stack, other), strict=True)
    assert steps == reference_steps == tuple(range(1, 17))  # each step once
    assert paused_losses == pytest.approx(reference_losses, abs=1e-6)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(paused)
