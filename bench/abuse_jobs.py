"""bench.abuse's worker-side attacks (issue 14, findings 2, 3 and 6), in its scenario shape.

Each is `(Stack, Keys, stop) -> counts`: it attacks, waits for `stop` (set once the victim
has measured its job wait) and leaves the worker idle for the next scenario. The stack's
worker (`loraforge worker`, concurrency 1) is one resident Celery pool process that claims
by the fair policy and forks a child per claimed job (worker/supervisor.py): the job's
process is a grandchild of the worker process this bench started.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
import psutil

from bench.abuse_common import (
    CREATED,
    TERMINAL,
    TIMEOUT,
    Keys,
    auth,
    newest_job,
    status,
    upload,
    wait_status,
)
from tests.e2e.stack import Stack

T = TypeVar("T")
STARTED = {"running"} | TERMINAL
STOP_LIMIT = 120.0  # seconds a cancelled job may take to end before the bench gives up on it


def cancel_storm(stack: Stack, keys: Keys, stop: threading.Event, count: int = 60) -> dict:
    """Finding 2: `count` jobs created and cancelled at once; each leaves a stale message.
    Counts the jobs the worker claimed before their cancel (each of those did fork a child)."""
    statuses: Counter = Counter()  # of the creates and the cancels
    body = {"model": "tiny", "training_file": keys.attacker_file}
    with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.attacker)) as c:

        def create_and_cancel(_: int) -> str | None:
            created = c.post("/v1/fine_tuning/jobs", json=body)
            statuses[created.status_code] += 1
            if created.status_code not in CREATED:
                return None
            cancel = c.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel")
            statuses[cancel.status_code] += 1
            return created.json()["id"]

        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            created = [job_id for job_id in pool.map(create_and_cancel, range(count)) if job_id]
        statuses["storm s"] = round(time.perf_counter() - start, 1)
        stop.wait(timeout=600)
        statuses["claimed before their cancel"] = sum(_ever_started(c, job) for job in created)
    return dict(statuses)


def backlog(stack: Stack, keys: Keys, stop: threading.Event, count: int = 16) -> dict:
    """Finding 3: the attacker queues `count` long jobs (its active-job quota); counts how
    many of them had not started when the victim's job started."""
    statuses: Counter = Counter()
    body = {
        "model": "tiny",
        "training_file": keys.attacker_file,
        "hyperparameters": {"n_epochs": 20, "batch_size": 1},  # 160 steps: ~15 s each here
    }
    with (
        httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.attacker)) as c,
        httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.victim)) as v,
    ):
        before = newest_job(v)
        created = []
        for _ in range(count):
            answer = c.post("/v1/fine_tuning/jobs", json=body)
            statuses[answer.status_code] += 1
            if answer.status_code in CREATED:
                created.append(answer.json()["id"])
        if _victim_started(v, before, stop):
            states = Counter(status(c, job_id) for job_id in created)
            statuses |= {f"attacker {name} at victim start": n for name, n in states.items()}
        else:
            statuses[f"victim's job not started within {STOP_LIMIT:.0f} s"] = 1
        stop.wait(timeout=600)
        _cancel_all(c, created)
    return dict(statuses)


def heavy_cancel(stack: Stack, keys: Keys, stop: threading.Event, rows: int = 512) -> dict:
    """Finding 6: a job whose one optimizer step takes many seconds (32 micro-batches of
    16 x ~900 tokens), cancelled while the victim's job waits; times until the job says
    `cancelled`, until its process is gone and until the victim's job started."""
    statuses: Counter = Counter()
    timings: dict[str, float | None] = {}
    file_id = upload(stack.base_url, keys.attacker, _long_rows(rows))
    body = {
        "model": "tiny",
        "training_file": file_id,
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": 16,
            "gradient_accumulation_steps": rows // 16,  # the whole epoch is one step
            "max_seq_length": 1024,
        },
    }
    with (
        httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.attacker)) as c,
        httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.victim)) as v,
    ):
        before = newest_job(v)
        created = c.post("/v1/fine_tuning/jobs", json=body)
        statuses[created.status_code] += 1
        if created.status_code in CREATED:
            job_id = created.json()["id"]
            wait_status(c, job_id, STARTED, STOP_LIMIT)
            processes = _wait_for(_job_processes)
            _wait_for(lambda: _training(c, job_id), STOP_LIMIT)  # past its setup, in the step
            # the victim's job waits behind it: its wait shows what the cancelled job costs
            victim_job = newest_job(v) if _victim_queued(v, before, stop) else None
            time.sleep(2.0)  # a few micro-batches into the step
            cancel = c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            statuses[cancel.status_code] += 1
            statuses["job processes"] = len(processes)
            timings = _watch_cancel(c, job_id, processes, v, victim_job)
    stop.wait(timeout=600)
    return dict(statuses) | timings


def _watch_cancel(
    attacker: httpx.Client,
    job_id: str,
    processes: list[psutil.Process],
    victim: httpx.Client,
    victim_job: str | None,
) -> dict[str, float | None]:
    """Seconds from now until the job ended, its processes were gone, the victim's job
    started; each as first seen by one loop polling every 0.1 s (None: not within limits)."""
    seen: dict[str, float | None] = dict.fromkeys(
        ["cancel -> cancelled s", "cancel -> process gone s", "cancel -> victim started s"]
    )
    checks = {
        "cancel -> cancelled s": lambda: status(attacker, job_id) in TERMINAL,
        "cancel -> process gone s": lambda: not any(map(_alive, processes)),
        "cancel -> victim started s": lambda: (
            victim_job is None or status(victim, victim_job) in STARTED
        ),
    }
    start = time.perf_counter()
    while None in seen.values() and time.perf_counter() < start + STOP_LIMIT:
        for name, check in checks.items():
            if seen[name] is None and check():
                seen[name] = round(time.perf_counter() - start, 2)
        time.sleep(0.1)
    return seen


def _long_rows(n: int) -> list[dict]:
    """Chat examples of ~900 tokens on the tiny model's character-level tokenizer."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"{i} " + "tell me more " * 40},
                {"role": "assistant", "content": "there is more " * 30},
            ]
        }
        for i in range(n)
    ]


def _job_processes() -> list[psutil.Process]:
    """The worker's job processes: the children of its pool process (worker/supervisor.py)."""
    found = []
    for process in psutil.Process().children():
        try:
            if "celery" in process.cmdline():
                found += [job for pool in process.children() for job in pool.children()]
        except psutil.NoSuchProcess:  # a `loraforge keys` command that just ended
            continue
    return found


def _events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]


def _ever_started(client: httpx.Client, job_id: str) -> bool:
    return any(e["message"].startswith("Fine-tuning job started") for e in _events(client, job_id))


def _training(client: httpx.Client, job_id: str) -> bool:
    """The job has announced its checkpoints: the last event before its first micro-batch."""
    return any("checkpoint_steps" in (e.get("data") or {}) for e in _events(client, job_id))


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has stopped computing
    except psutil.NoSuchProcess:
        return False


def _wait_for(find: Callable[[], T], limit: float = 30.0) -> T:
    """`find()` once it returns something (polled every 0.05 s), or its last answer."""
    deadline = time.monotonic() + limit
    while not (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _victim_queued(victim: httpx.Client, before: str | None, stop: threading.Event) -> bool:
    """Wait (bounded) until the victim has created its job for this scenario."""
    deadline = time.monotonic() + STOP_LIMIT
    while not stop.is_set() and time.monotonic() < deadline:
        if newest_job(victim) != before:
            return True
        time.sleep(0.1)
    return False


def _victim_started(victim: httpx.Client, before: str | None, stop: threading.Event) -> bool:
    """Wait (bounded) until the victim's job for this scenario has left `queued`."""
    if not _victim_queued(victim, before, stop):
        return False
    job_id = newest_job(victim)
    return job_id is not None and wait_status(victim, job_id, STARTED, STOP_LIMIT) is not None


def _cancel_all(client: httpx.Client, job_ids: list[str]) -> None:
    """Cancel the jobs and wait until they have ended: the next scenario finds the worker idle."""
    for job_id in job_ids:
        client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    for job_id in job_ids:
        wait_status(client, job_id, TERMINAL, STOP_LIMIT)
