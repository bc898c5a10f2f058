"""Issue 14, finding 2: messages for cancelled jobs cost the worker no process.

60 jobs created and cancelled in 0.8 s made another organization's job wait 161 s: every
stale message still got a fresh pool process (~2.5 s each). Now the resident pool process
answers such a message with one claim that finds nothing, and forks a child only for a
job it claimed; a wake-up runs whichever job the fair policy picks, here the victim's.
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import FULL, wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

N_STALE = 60 if FULL else 10


def test_messages_for_cancelled_jobs_start_no_process(make_stack):
    stack = make_stack()
    file_id = stack.upload(chat_rows(4))
    stale = stack.submit(file_id, N_STALE, n_epochs=1, batch_size=2)
    for job_id in stale:
        response = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert response.json()["status"] == "cancelled"
    stack.login("victim")
    [victim] = stack.submit(stack.upload(chat_rows(4)), 1, n_epochs=1, batch_size=2)
    stack.add_worker("w1")  # only now: every stale message is ahead of the victim's

    job = stack.wait_terminal([victim], 120)[victim]
    assert job.status == "succeeded"
    deliveries = wait_until(
        lambda: (d := stack.journal("delivery")) and len(d) == N_STALE + 1 and d,
        60,
        "every message to be delivered",
        stack.logs,
    )
    print(
        f"\nstale messages: {N_STALE} cancelled jobs ahead of the victim's; it started "
        f"{(job.started_at - job.created_at).total_seconds():.1f}s after its creation "
        "(the worker's start included); "
        f"{len({d['pid'] for d in deliveries})} pool process(es) took the messages"
    )
    assert len({d["pid"] for d in deliveries}) == 1  # one resident process, never recycled
    assert {e["job"] for e in stack.journal("step")} == {victim}
    assert {j.attempt for j in stack.jobs(stale).values()} == {0}
