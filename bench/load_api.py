"""Load: 32 concurrent clients poll a job and list its events while the job trains.

Starts the real stack as a user does (`loraforge api` + `loraforge worker` as child
processes, see tests/e2e/stack.py) on the embedded default (SQLite + filesystem broker)
or on PostgreSQL + Redis (`--postgres`), submits a long job, waits until it runs, then
runs the clients for `--seconds`. Prints p50 / p99 latency, requests per second and the
error count (any non-2xx or transport error), last.

The per-organization rate limit is switched off for the run (all 32 clients share one
organization, and the point is the API's own latency, not the limiter's refusals).

    .venv/bin/python bench/load_api.py [--seconds 120] [--clients 32] [--postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.tiny_model import build_tiny_model
from tests.e2e.stack import cli, free_port, running, stack_env
from tests.factories import chat_rows

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_env(name: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return {
        "LORAFORGE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        "LORAFORGE_BROKER_URL": "redis://127.0.0.1:6379/14",
    }


def start_job(base_url: str, key: str) -> str:
    """A job long enough to keep training through the measurement; returns its id once running."""
    import json

    headers = {"Authorization": f"Bearer {key}"}
    data = "".join(json.dumps(row) + "\n" for row in chat_rows(400)).encode()
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        file_id = client.post(
            "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        body = {"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 50}}
        job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 180
        while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the job did not start within 180 s")
            time.sleep(0.5)
    return job_id


def client_loop(base_url, key, job_id, stop_at, samples, errors, lock) -> None:
    paths = [f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events?limit=20"]
    mine, failed, i = [], 0, 0
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                ok = client.get(paths[i % 2], timeout=30).is_success
            except httpx.HTTPError:
                ok = False
            mine.append(time.perf_counter() - start)
            failed += not ok
            i += 1
    with lock:
        samples.extend(mine)
        errors.append(failed)


def measure(base_url: str, key: str, job_id: str, clients: int, seconds: float) -> None:
    samples: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=client_loop, args=(base_url, key, job_id, stop_at, samples, errors, lock)
        )
        for _ in range(clients)
    ]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    status = httpx.get(
        f"{base_url}/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
    ).json()["status"]
    cuts = statistics.quantiles(samples, n=100)
    print(f"job status at the end: {status}; clients {clients}; measured {elapsed:.1f} s")
    print(f"requests {len(samples)}  errors {sum(errors)}")
    p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    print(f"p50 {p50:.1f} ms  p99 {p99:.1f} ms  rps {len(samples) / elapsed:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loraforge-load-"))
    model = build_tiny_model(root / "model")
    extra = postgres_env(f"loraforge_load_{uuid.uuid4().hex[:8]}") if args.postgres else {}
    env = stack_env(root / "data", model, LORAFORGE_RATE_LIMIT_PER_SECOND="0", **extra)
    env["LORAFORGE_METRICS_EVERY_STEPS"] = "5"
    cli(env, "db", "upgrade")
    port = free_port()
    with running([["api", "--port", str(port)], ["worker"]], env, root / "logs", port) as stack:
        key = stack.key("load")
        job_id = start_job(stack.base_url, key)
        print(f"backend {'postgresql+redis' if args.postgres else 'sqlite+filesystem'}; "
              f"job {job_id} running; polling for {args.seconds:.0f} s")  # fmt: skip
        measure(stack.base_url, key, job_id, args.clients, args.seconds)
        httpx.post(
            f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/cancel",
            headers={"Authorization": f"Bearer {key}"},
        )


if __name__ == "__main__":
    main()
