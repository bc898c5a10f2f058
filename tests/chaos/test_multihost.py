"""Issue 13 §4: 3 worker hosts and 2 API hosts on loopback, nothing shared but
PostgreSQL, Redis and the S3 server, workers `kill -9`ed mid-training.

The full size (50 jobs, 10 kills) is `python -m bench.multihost`; CI runs a few jobs
(`LORAFORGE_MULTIHOST_JOBS`, `LORAFORGE_MULTIHOST_KILLS` to change it). What is proved
(tests/chaos/multihost.py): no job lost (every one `succeeded`); none trained twice (one
adapter row, one succeeded attempt and one completion event per job, one `started` event
per attempt, and per job no attempt ever stepped after a later one); every adapter
answers on both API hosts, each reading it from the store into its own cache.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.harness import FULL, assert_never_two_attempts_at_once
from tests.chaos.multihost import HOSTS_ENV, simulate

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

JOBS = int(os.environ.get("LORAFORGE_MULTIHOST_JOBS", 50 if FULL else 4))
KILLS = int(os.environ.get("LORAFORGE_MULTIHOST_KILLS", 10 if FULL else 2))


@pytest.mark.parametrize("storage_env", ["s3"], indirect=True)
def test_three_worker_hosts_and_two_api_hosts_lose_and_repeat_no_job(make_stack):
    stack = make_stack(**HOSTS_ENV)
    result = simulate(stack, jobs=JOBS, kills=KILLS)
    print("\n" + result.summary())
    assert result.statuses == {"succeeded": JOBS}  # 0 lost
    assert result.adapters_per_job == dict.fromkeys(result.adapters_per_job, 1)
    assert len(result.adapters_per_job) == JOBS
    assert result.trained_twice == 0
    assert result.completions_per_job == dict.fromkeys(result.adapters_per_job, 1)
    assert result.starts_match_attempts
    assert len(result.kills) == KILLS and len(result.recoveries) == KILLS
    assert result.callable == {"api-1": JOBS, "api-2": JOBS}
    assert sum(result.spread.values()) == JOBS
    assert_never_two_attempts_at_once(stack)
    # each API host served every adapter from its own cache, filled from the store
    for data_dir in (stack.tmp / "data", stack.tmp / "hosts" / "api-2"):
        cached = [p for p in (data_dir / "adapter-cache").iterdir() if not p.name.startswith(".")]
        assert len(cached) == JOBS, data_dir
