"""What bench.abuse's scenarios share: the two organizations, their requests, job polling."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

TIMEOUT = 60.0  # per request: a stalled service shows as a timeout, not a hang
TERMINAL = {"succeeded", "failed", "cancelled"}
CREATED = (200, 202)  # 202: queued, its wake-up message deferred to the sweep


@dataclass
class Keys:
    attacker: str
    victim: str
    victim_file: str
    attacker_file: str


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(base_url: str, key: str, rows: list[dict]) -> str:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    answer = httpx.post(
        f"{base_url}/v1/files",
        files={"file": ("t.jsonl", data)},
        data={"purpose": "fine-tune"},
        headers=auth(key),
        timeout=TIMEOUT,
    )
    answer.raise_for_status()
    return answer.json()["id"]


def status(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]


def wait_status(client: httpx.Client, job_id: str, done: set[str], limit: float) -> float | None:
    """Seconds until the job's status is in `done` (polled every 0.1 s); None past `limit`."""
    start = time.perf_counter()
    while time.perf_counter() < start + limit:
        if status(client, job_id) in done:
            return time.perf_counter() - start
        time.sleep(0.1)
    return None


def newest_job(client: httpx.Client) -> str | None:
    """The id of the client's organization's newest job (lists are newest first)."""
    jobs = client.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()["data"]
    return jobs[0]["id"] if jobs else None
