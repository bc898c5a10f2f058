"""Issue 13 §4: several machines simulated on loopback, for tests/chaos/test_multihost.py
and bench/multihost.py.

Two API hosts (each with its sweeper, serving inference) and three worker hosts, each
process with a data dir and a temp dir of its own (`ChaosStack.host_env`): nothing is
shared but PostgreSQL, Redis and the S3 server. Jobs go in alternately through both APIs,
each training on a file uploaded through the other, at most one per worker host in
flight; some are `kill -9`ed mid-training (the worker's pool child or its master, which
is restarted, as a rebooted host would be). The result says what the database and the
workers' journal show: jobs lost, jobs trained twice, adapters callable per API host,
dispatch latency (submit → first claim), and how jobs spread over the workers.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlalchemy import select, text

from app.db.models import JobEvent
from app.db.session import session_scope
from tests.chaos.harness import TERMINAL, ChaosStack, Worker, wait_until
from tests.factories import chat_rows, complete

COMPLETED, STARTED = "The job has successfully completed", "Fine-tuning job started"
WORKER_HOSTS = ["worker-1", "worker-2", "worker-3"]
JOB = {"n_epochs": 2, "batch_size": 2}  # 8 examples: 8 optimizer steps, checkpoint at 4 and 8
EXAMPLES, STEPS = 8, 8
# Every host serves inference; steps pause so kills land mid-training; one torch thread
# per process, since five processes and their job children share the machine's cores.
HOSTS_ENV = {
    "LORAFORGE_INFERENCE_ENABLED": "true",
    "LORAFORGE_CHAOS_STEP_SLEEP": "0.15",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Result:
    jobs: int
    statuses: Counter
    adapters_per_job: Counter  # adapter rows per job: 1 each, or a job was trained twice
    successes_per_job: Counter  # attempts that ended `succeeded`, per job (journal)
    completions_per_job: Counter  # "The job has successfully completed" events, per job
    starts_match_attempts: bool  # each job has one "started" event per attempt it counts
    kills: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)  # kill → resumed step, seconds
    dispatch: list[float] = field(default_factory=list)  # submit → first claim, seconds
    spread: Counter = field(default_factory=Counter)  # succeeded attempts per worker host
    attempts: Counter = field(default_factory=Counter)  # jobs per attempt count
    steps_rerun: int = 0  # optimizer steps taken again after a kill (from the checkpoint)
    callable: dict[str, int] = field(default_factory=dict)  # adapters answering, per API
    wall: float = 0.0
    # what PostgreSQL and Redis saw over the run (the database's counters, Redis's INFO)
    database: dict[str, int] = field(default_factory=dict)
    redis_commands: dict[str, int] = field(default_factory=dict)
    # jobs whose scratch (`tmp/<job>/`) is still on a worker host once every job ended
    scratch_left: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.jobs - self.statuses["succeeded"]

    @property
    def trained_twice(self) -> int:
        counts = (self.adapters_per_job, self.successes_per_job, self.completions_per_job)
        return len({job for count in counts for job, n in count.items() if n > 1})

    def summary(self) -> str:
        dispatch = _percentiles(self.dispatch)
        kills = Counter(self.kills)
        return "\n".join(
            [
                f"multihost: {self.jobs} jobs through 2 API hosts on 3 worker hosts in "
                f"{self.wall:.0f}s; statuses {dict(self.statuses)}",
                f"  lost {self.lost}, trained twice {self.trained_twice}; attempts per job "
                f"{dict(sorted(self.attempts.items()))}; steps re-run after kills "
                f"{self.steps_rerun}",
                f"  kill -9: {len(self.kills)} ({dict(kills)}); recovery (kill → resumed step) "
                f"{_percentiles(self.recoveries)}",
                f"  adapters callable per API host: {self.callable} of {self.jobs}",
                f"  dispatch (submit → running): {dispatch}",
                f"  jobs per worker host (succeeded attempts): {dict(sorted(self.spread.items()))}",
                f"  PostgreSQL, per job: {_per(self.database, self.jobs)}",
                f"  Redis commands, per job: {_per(self.redis_commands, self.jobs)}",
                f"  scratch left on worker hosts (jobs): {self.scratch_left}",
            ]
        )


def _per(counts: dict[str, int], jobs: int) -> str:
    return ", ".join(f"{name} {n / jobs:.1f}" for name, n in counts.items()) or "n/a"


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):.2f}s, p99 {p99:.2f}s, max {ordered[-1]:.2f}s"


def start_hosts(stack: ChaosStack) -> tuple[list[httpx.Client], dict[str, Worker]]:
    """The second API host (the stack's own API is the first) and the worker hosts."""
    # the workers first: they boot (import torch) while the second API starts
    workers = {host: stack.add_worker(host, own_host=True) for host in WORKER_HOSTS}
    apis = [stack.http, stack.add_api("api-2")]
    wait_for_workers(stack)  # so that dispatch latency does not count the hosts' boot
    return apis, workers


def simulate(stack: ChaosStack, *, jobs: int, kills: int, seed: int = 13) -> Result:
    """Run `jobs` jobs, `kills` of them killed once mid-training; check what happened."""
    rng = random.Random(seed)
    began = time.monotonic()
    apis, workers = start_hosts(stack)
    database, redis_commands = database_counters(stack), redis_counters(stack)
    files = [stack.upload(chat_rows(EXAMPLES), client=api) for api in apis]
    # the step after which each chosen job is killed: early enough that the (polling) loop
    # sees the job before it ends, on either side of the first checkpoint (step 4)
    targets = {index: rng.randint(2, STEPS // 2 + 1) for index in rng.sample(range(jobs), kills)}
    ids: list[str] = []
    killed: dict[str, tuple[str, float]] = {}  # job → (kind, when)
    kinds: list[str] = []
    deadline = time.monotonic() + 60 + 20 * jobs
    while len(ids) < jobs or not _all_terminal(stack, ids):
        assert time.monotonic() < deadline, "the simulation overran its time bound"
        if len(ids) < jobs and _in_flight(stack, ids) < len(workers):
            # alternately through each API, on the file uploaded through the other
            api, file_id = apis[len(ids) % 2], files[(len(ids) + 1) % 2]
            response = stack.create_job(file_id, client=api, **JOB)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        for index, step in list(targets.items()):
            if index < len(ids) and (host := _training_at(stack, ids[index], step)):
                kind = "child" if len(kinds) % 2 == 0 else "master"
                _kill(workers[host], kind)
                kinds.append(kind)
                killed[ids[index]] = (kind, time.time())
                del targets[index]
        time.sleep(0.1)
    time.sleep(1.5)  # PostgreSQL's statistics reach its views within a second
    result = _check(stack, ids, killed)
    result.database = _delta(database, database_counters(stack))
    result.redis_commands = _delta(redis_commands, redis_counters(stack))
    result.kills = kinds
    result.scratch_left = {host: len(scratch_of(stack, host)) for host in WORKER_HOSTS}
    result.callable = {f"api-{n + 1}": _callable(api, stack, ids) for n, api in enumerate(apis)}
    result.wall = time.monotonic() - began
    return result


def _all_terminal(stack: ChaosStack, ids: list[str]) -> bool:
    return all(job.status in TERMINAL for job in stack.jobs(ids).values())


def _in_flight(stack: ChaosStack, ids: list[str]) -> int:
    return sum(job.status not in TERMINAL for job in stack.jobs(ids).values())


def _training_at(stack: ChaosStack, job_id: str, step: int) -> str | None:
    """The worker host of the job's first attempt once it has taken `step` steps, if it is
    still running (a kill must land during training)."""
    steps = [e for e in stack.journal("step") if e["job"] == job_id and e["attempt"] == 1]
    if not steps or max(e["step"] for e in steps) < step or max(e["step"] for e in steps) >= STEPS:
        return None
    return steps[-1]["host"]


def _kill(worker: Worker, kind: str) -> None:
    if kind == "child":
        worker.kill_child()  # Celery forks a fresh pool child at once
    else:
        worker.kill_master()
        worker.start()  # the host comes back, with the same scratch dir


def _check(stack: ChaosStack, ids: list[str], killed: dict[str, tuple[str, float]]) -> Result:
    jobs = stack.jobs(ids)
    with session_scope(stack.db_url) as session:
        query = select(JobEvent.job_id, JobEvent.message).where(JobEvent.job_id.in_(ids))
        events = [(job_id, message) for job_id, message in session.execute(query)]
    results = [e for e in stack.journal("result") if e["job"] in jobs]
    steps = stack.journal("step")
    result = Result(
        jobs=len(ids),
        statuses=Counter(job.status for job in jobs.values()),
        adapters_per_job=Counter(a.job_id for a in stack.adapters(ids)),
        successes_per_job=Counter(e["job"] for e in results if e["result"] == "succeeded"),
        completions_per_job=Counter(job for job, message in events if message == COMPLETED),
        starts_match_attempts=all(
            sum(j == job.id and m.startswith(STARTED) for j, m in events) == job.attempt
            for job in jobs.values()
        ),
        dispatch=[_seconds(job.started_at, job.created_at) for job in jobs.values()],
        spread=Counter(e["host"] for e in results if e["result"] == "succeeded"),
        attempts=Counter(job.attempt for job in jobs.values()),
    )
    for job_id, (_, when) in killed.items():
        later = [e["t"] for e in steps if e["job"] == job_id and e["attempt"] > 1]
        if later:
            result.recoveries.append(min(later) - when)
    for job_id in ids:
        taken = [e["step"] for e in steps if e["job"] == job_id]
        result.steps_rerun += len(taken) - len(set(taken))
    return result


def _seconds(later: datetime | None, earlier: datetime) -> float:
    return (later - earlier).total_seconds() if later else float("nan")


def _callable(api: httpx.Client, stack: ChaosStack, ids: list[str]) -> int:
    """How many of the jobs' adapters answer a completion on this API host."""
    answered = 0
    for job in stack.jobs(ids).values():
        if job.fine_tuned_model:
            response = complete(api, model=job.fine_tuned_model, max_tokens=2)
            answered += response.status_code == 200
    return answered


def wait_for_workers(stack: ChaosStack, timeout: float = 120) -> None:
    """Every worker's pool child is up (a fresh stack's workers take a while to start)."""
    wait_until(lambda: all(w.children() for w in stack.workers), timeout, "workers", stack.logs)


def database_counters(stack: ChaosStack) -> dict[str, int]:
    """Rows the test database had written, from `pg_stat_database` (its own database, so
    nothing else counts; the harness's polling only reads, so it adds nothing here)."""
    query = text(
        "SELECT tup_inserted AS rows_inserted, tup_updated AS rows_updated, "
        "tup_deleted AS rows_deleted "
        "FROM pg_stat_database WHERE datname = current_database()"
    )
    with session_scope(stack.db_url) as session:
        return dict(session.execute(query).mappings().one())


def redis_counters(stack: ChaosStack) -> dict[str, int]:
    """Commands the stack's private Redis ran, by command (the busiest few, and all)."""
    import redis

    stats = redis.Redis(port=stack.redis.port).info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    return calls | {"all": sum(calls.values())}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    changed = {name: n - before.get(name, 0) for name, n in after.items()}
    return dict(sorted(changed.items(), key=lambda item: -item[1])[:8])


def scratch_of(stack: ChaosStack, host: str) -> list[str]:
    """The jobs with scratch on a host (`<data dir>/artifacts/tmp/<job>/`)."""
    root = stack.tmp / "hosts" / host / "artifacts" / "tmp"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
