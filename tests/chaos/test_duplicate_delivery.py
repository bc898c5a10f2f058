"""Issue 5, fault 2: Redis redelivers a running job's message (celery#5935), forced.

A visibility timeout of 2 s and two workers: while one worker trains, kombu puts the
unacked message back and the other worker receives it. The claim fences it: exactly
one attempt takes optimizer steps, one adapter and one completion per job.
"""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from app.db.models import JobEvent
from app.db.session import session_scope
from tests.chaos.harness import FULL, wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

N_JOBS = 3 if FULL else 1
STEPS = 16  # 16 examples, batch 2, 2 epochs


def test_a_redelivered_job_is_trained_once(make_stack):
    stack = make_stack(LORAFORGE_BROKER_VISIBILITY_TIMEOUT="2", LORAFORGE_CHAOS_STEP_SLEEP="0.4")
    stack.add_worker("w1")
    stack.add_worker("w2")
    file_id = stack.upload(chat_rows(16))
    ids = []
    for _ in range(N_JOBS):  # one at a time, so the other worker is free to take the copy
        ids += stack.submit(file_id, 1, n_epochs=2, batch_size=2)
        stack.wait_terminal(ids[-1:], 120)
    jobs = stack.jobs(ids)

    def winners() -> list[dict] | None:
        # The supervisor journals a job's result after its child ends, which is after the
        # database says succeeded (it still removes the scratch): wait for the line.
        won = [r for r in stack.journal("result") if r["result"] == "succeeded"]
        return won if {r["job"] for r in won} >= set(ids) else None

    wait_until(winners, 60, "each winning attempt's result in the journal", stack.logs)
    deliveries = stack.journal("delivery")
    results = stack.journal("result")
    for job_id in ids:
        assert jobs[job_id].status == "succeeded" and jobs[job_id].attempt == 1
        [won] = [r for r in results if r["job"] == job_id and r["result"] == "succeeded"]
        copies = [d for d in deliveries if d["job"] == job_id and d["pid"] != won["pid"]]
        # The scenario happened: a copy arrived while the job was still training.
        assert any(copy["t"] < won["t"] for copy in copies) and len(copies) < 15, copies
        outcomes = [r["result"] for r in results if r["job"] == job_id and r is not won]
        assert outcomes == ["skipped"] * len(outcomes)  # every copy did nothing
        steps = [(e["attempt"], e["step"]) for e in stack.journal("step") if e["job"] == job_id]
        assert steps == [(1, step) for step in range(1, STEPS + 1)]  # one attempt, each step once
        # every step in the winner's child: the process that claimed the job ran it
        assert {e["ppid"] for e in stack.journal("step") if e["job"] == job_id} == {won["pid"]}
    counts = [sum(d["job"] == job_id for d in deliveries) for job_id in ids]
    print(
        f"\nduplicate delivery: deliveries per job {counts}, results "
        f"{dict(Counter(r['result'] for r in results))}, optimizer steps per job "
        f"{[sum(e['job'] == j for e in stack.journal('step')) for j in ids]} (planned {STEPS})"
    )
    assert sorted(a.job_id for a in stack.adapters(ids)) == sorted(ids)
    with session_scope(stack.db_url) as session:
        completions = Counter(
            session.scalars(
                select(JobEvent.job_id).where(
                    JobEvent.job_id.in_(ids),
                    JobEvent.message == "The job has successfully completed",
                )
            )
        )
    assert completions == Counter(ids)
