"""Hostile tenants (issue 14): replay the attacks against a running stack, measure the victim.

Starts the real stack as a user does (`loraforge api` + `loraforge worker` as child processes,
tests/e2e/stack.py) on loopback, on the embedded default or on PostgreSQL + Redis
(`--postgres`), with two organizations: `attacker` and `victim`. First the quiet baseline, then
each attack in turn: while it runs, the victim repeats its probes (`/health`, its files, a
5-token completion) and waits for one small job to start. Printed last: per attack and probe,
the victim's median latency as a ratio to the quiet baseline (target <= 2x), the victim's job
wait as a ratio, and every HTTP 500 seen by anyone (target 0).

    .venv/bin/python -m bench.abuse [--postgres] [--probes 10] [--only stalled-uploads,backlog,...]
        [--shared-cores]

The API runs on a core of its own; the worker and the bench's clients share the rest
(`role_cpus`: as on separate machines). `--shared-cores` puts everything on all cores.

The worker-side attacks (bench/abuse_jobs.py) run against the stack's one worker
(`loraforge worker`, concurrency 1: a resident pool process that claims by the fair policy
and forks a child per job): 60 jobs created and cancelled at once (finding 2), a backlog of
16 long jobs (finding 3: how many had not started when the victim's did), and a job whose
one optimizer step takes tens of seconds, cancelled while the victim's job waits (finding 6:
seconds until it says `cancelled`, until its process is gone, until the victim's job starts).

Every loop is bounded in count and in time; everything talks to 127.0.0.1 only. A scenario
is a function `(Stack, Keys, stop: threading.Event) -> dict` that attacks until `stop` is set
(the victim has measured) and returns its own counts (statuses seen, keyed by the int code);
add one to SCENARIOS. The victim's job wait is measured under every scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.tiny_model import build_tiny_model
from bench.abuse_common import CREATED, TERMINAL, TIMEOUT, Keys, auth, upload, wait_status
from bench.abuse_jobs import backlog, cancel_storm, heavy_cancel
from bench.load_api import postgres_env
from tests.e2e.stack import Stack, cli, free_port, running, stack_env
from tests.factories import chat_rows

JOB_WAIT_LIMIT = 180.0


# -- the victim's probes ------------------------------------------------------------------
def probes(client: httpx.Client, keys: Keys) -> dict[str, Callable[[], httpx.Response]]:
    completion = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    return {
        "GET /health": lambda: client.get("/health"),
        "GET /v1/files": lambda: client.get("/v1/files", headers=auth(keys.victim)),
        "5-token completion": lambda: client.post(
            "/v1/completions", json=completion, headers=auth(keys.victim)
        ),
    }


def measure_victim(stack: Stack, keys: Keys, rounds: int) -> tuple[dict[str, float], Counter]:
    """Median seconds per probe over `rounds` rounds, and the statuses the victim got."""
    samples: dict[str, list[float]] = {}
    statuses: Counter = Counter()
    with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT) as client:
        for _ in range(rounds):
            for name, probe in probes(client, keys).items():
                start = time.perf_counter()
                try:
                    statuses[probe().status_code] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                samples.setdefault(name, []).append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}, statuses


def job_wait(stack: Stack, keys: Keys) -> float | None:
    """Seconds from creating a small victim job until it leaves `queued` (then cancelled)."""
    body = {"model": "tiny", "training_file": keys.victim_file, "hyperparameters": {"n_epochs": 1}}
    with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.victim)) as c:
        created = c.post("/v1/fine_tuning/jobs", json=body)
        if created.status_code not in CREATED:
            return None
        job_id = created.json()["id"]
        waited = wait_status(c, job_id, {"running"} | TERMINAL, JOB_WAIT_LIMIT)
        c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        # the next scenario starts with an idle worker: wait until this job has ended
        wait_status(c, job_id, TERMINAL, JOB_WAIT_LIMIT)
    return waited


# -- the attacks ----------------------------------------------------------------------------
def stalled_uploads(stack: Stack, keys: Keys, stop: threading.Event, count: int = 35) -> dict:
    """Finding 1: sockets that send an upload's headers and one line, then stall."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {keys.attacker}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n"
    ).encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(head)
        sockets.append(sock)
    stop.wait(timeout=600)
    counts: Counter = Counter()
    for sock in sockets:
        sock.settimeout(0.5)
        try:
            answer = sock.recv(64)
            counts[f"answered {answer[9:12].decode() or 'nothing (closed)'}"] += 1
        except OSError:
            counts["still open"] += 1
        sock.close()
    return dict(counts)


def huge_prompts(stack: Stack, keys: Keys, stop: threading.Event) -> dict:
    """Finding 4: 10 MB chat messages (past the body cap) and 1.9 MB ones (under it)."""
    statuses: Counter = Counter()
    bodies = [  # encoded once: the attacker's own CPU should not be what slows the victim
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "w" * size}]})
        for size in (10_000_000, 1_900_000)
    ]
    headers = auth(keys.attacker) | {"Content-Type": "application/json"}

    def attack(index: int) -> None:
        with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT) as client:
            for _ in range(50):  # bounded
                if stop.is_set():
                    return
                body = bodies[index % 2]
                try:
                    answer = client.post("/v1/chat/completions", content=body, headers=headers)
                    statuses[answer.status_code] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(attack, range(4)))
    return dict(statuses)


def open_streams(stack: Stack, keys: Keys, stop: threading.Event, count: int = 50) -> dict:
    """Finding 5: 50 concurrent streams of one tenant, reopened as they end."""
    statuses: Counter = Counter()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 512, "stream": True}

    def attack(_: int) -> None:
        with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT) as client:
            for _ in range(200):  # bounded
                if stop.is_set():
                    return
                try:
                    with client.stream(
                        "POST", "/v1/completions", json=body, headers=auth(keys.attacker)
                    ) as answer:
                        statuses[answer.status_code] += 1
                        for _ in answer.iter_lines():
                            if stop.is_set():
                                break
                    if answer.status_code == 429:
                        time.sleep(float(answer.headers.get("Retry-After", "1")))
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(attack, range(count)))
    return dict(statuses)


SCENARIOS: dict[str, Callable[[Stack, Keys, threading.Event], dict]] = {
    "stalled-uploads": stalled_uploads,
    "huge-prompts": huge_prompts,
    "open-streams": open_streams,
    "cancel-storm": cancel_storm,
    "backlog": backlog,
    "heavy-cancel": heavy_cancel,
}


def quota_race(stack: Stack, keys: Keys, quota: int, creates: int = 40) -> dict:
    """Finding 1 (quota): `creates` concurrent job creations against the active-job quota."""
    body = {"model": "tiny", "training_file": keys.attacker_file}
    with httpx.Client(base_url=stack.base_url, timeout=TIMEOUT, headers=auth(keys.attacker)) as c:
        with ThreadPoolExecutor(creates) as pool:
            answers = list(
                pool.map(lambda _: c.post("/v1/fine_tuning/jobs", json=body), range(creates))
            )
        for answer in answers:
            if answer.status_code in CREATED:
                c.post(f"/v1/fine_tuning/jobs/{answer.json()['id']}/cancel")
    counts = Counter(answer.status_code for answer in answers)
    created = sum(counts[code] for code in CREATED)
    return {"statuses": dict(counts), "created": created, "quota": quota}


# -- the run ----------------------------------------------------------------------------------
def role_cpus(*, shared: bool) -> tuple[list[set[int] | None] | None, str]:
    """CPUs for the API and the worker, and a line saying so; pins this process (the clients).

    In production the API, the workers and the tenants' clients are different machines. On
    one small machine they would share its cores, and the victim would then measure the
    attacker's client threads and the worker's training competing with the API for CPU,
    not the service letting one tenant stall another. So by default the API gets the first
    core to itself; the worker (and the jobs it forks) and this process's clients share the
    others. `--shared-cores` measures everything on all cores, as before.
    """
    cores = sorted(os.sched_getaffinity(0))
    if shared or len(cores) < 2:
        return None, f"shared cores: API, worker and clients on {len(cores)}"
    api, rest = {cores[0]}, set(cores[1:])
    os.sched_setaffinity(0, rest)
    return [api, rest], f"API on CPU {cores[0]}; worker and clients on CPU {sorted(rest)}"


def run_scenario(stack: Stack, keys: Keys, attack, rounds: int):
    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(attack(stack, keys, stop)))
    thread.start()
    time.sleep(2.0)  # let the attack build up before the victim measures
    latencies, statuses = measure_victim(stack, keys, rounds)
    waited = job_wait(stack, keys)
    stop.set()
    thread.join(timeout=120)
    return latencies, statuses, waited, result


def report(name: str, latencies, baseline, statuses, waited, base_wait, attacker) -> int:
    errors = statuses.get(500, 0) + attacker.get(500, 0)
    for probe, seconds in latencies.items():
        ratio = seconds / baseline[probe]
        mark = "ok" if ratio <= 2 else "OVER 2x"
        print(f"  {name:18} {probe:20} {seconds * 1000:9.1f} ms  {ratio:6.2f}x  {mark}")
    wait = "n/a" if waited is None or base_wait is None else f"{waited / base_wait:.2f}x"
    print(f"  {name:18} {'job wait':20} {(waited or 0):9.2f} s   {wait}")
    print(f"  {name:18} victim statuses {dict(statuses)}; attacker {attacker}; HTTP 500s: {errors}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--probes", type=int, default=10, help="victim rounds per scenario")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LORAFORGE_NAME=VALUE",
        help="a setting for the stack (repeatable), e.g. LORAFORGE_INFERENCE_BATCH_SHARE_PER_ORG=1",
    )
    parser.add_argument(
        "--shared-cores",
        action="store_true",
        help="run the API, the worker and the bench's clients on all cores together",
    )
    args = parser.parse_args()
    cpus, layout = role_cpus(shared=args.shared_cores)
    root = Path(tempfile.mkdtemp(prefix="loraforge-abuse-"))
    model = build_tiny_model(root / "model")
    extra = postgres_env(f"loraforge_abuse_{uuid.uuid4().hex[:8]}") if args.postgres else {}
    env = stack_env(root / "data", model, **extra, **dict(s.split("=", 1) for s in args.set))
    cli(env, "db", "upgrade")
    port = free_port()
    commands = [["api", "--port", str(port)], ["worker"]]
    with running(commands, env, root / "logs", port, cpus=cpus) as stack:
        keys = Keys(stack.key("attacker"), stack.key("victim"), "", "")
        keys.victim_file = upload(stack.base_url, keys.victim, chat_rows(8))
        keys.attacker_file = upload(stack.base_url, keys.attacker, chat_rows(8))
        measure_victim(stack, keys, 1)  # warm: the model loads on the first completion
        print(f"backend {'postgresql+redis' if args.postgres else 'sqlite+filesystem'}; "
              f"{args.probes} victim rounds per scenario; {layout}")  # fmt: skip
        baseline, statuses = measure_victim(stack, keys, args.probes)
        base_wait = job_wait(stack, keys)
        errors = report("quiet", baseline, baseline, statuses, base_wait, base_wait, {})
        for name in args.only.split(","):
            latencies, statuses, waited, attacker = run_scenario(
                stack, keys, SCENARIOS[name], args.probes
            )
            errors += report(name, latencies, baseline, statuses, waited, base_wait, attacker)
        race = quota_race(stack, keys, quota=16)
        errors += race["statuses"].get(500, 0)
        held = "ok" if race["created"] <= race["quota"] else "BROKEN"
        print(f"  quota race: 40 concurrent creates, quota 16: {race['statuses']} -> {held}")
        print(f"HTTP 500s in all: {errors}")


if __name__ == "__main__":
    main()
