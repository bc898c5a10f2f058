"""Issue 11 §5 as a user meets it, on `loraforge up` (SQLite + the filesystem broker, the
API, a training worker and a webhooks worker) and on PostgreSQL + Redis with each role a
process of its own: a job ends while its receiver is down; the
receiver starts afterwards and still gets the signed event, which standardwebhooks and the
openai SDK verify. Loopback only; every wait is bounded."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from standardwebhooks import Webhook

from tests.conftest import REDIS_URL
from tests.e2e.stack import cli, free_port, running, stack_env, tail_logs
from tests.factories import chat_rows, jsonl
from tests.webhook_receiver import Receiver, receiving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def poll(what, check, stack, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen:\n" + tail_logs(stack.logs))


@pytest.mark.parametrize(
    "services", ["embedded", pytest.param("postgres-redis", marks=pytest.mark.postgres)]
)
def test_a_receiver_started_after_the_job_ended_gets_the_signed_event(
    request, services, tmp_path, tiny_model_dir
):
    port = free_port()
    extra = {"LORAFORGE_WEBHOOK_ALLOW_PRIVATE": "true", "LORAFORGE_SWEEP_INTERVAL_SECONDS": "1"}
    commands = [["up", "--port", str(port)]]
    if services == "postgres-redis":
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        extra |= {
            "LORAFORGE_DATABASE_URL": request.getfixturevalue("pg_database_url"),
            "LORAFORGE_BROKER_URL": REDIS_URL,
        }
        commands = [["api", "--port", str(port)], ["worker"], ["worker", "--queue", "webhooks"]]
    env = stack_env(tmp_path / "data", tiny_model_dir, **extra)
    if services == "postgres-redis":
        cli(env, "db", "upgrade")
    receiver = Receiver(free_port())  # not listening yet
    with running(commands, env, tmp_path / "logs", port) as stack:
        headers = {"Authorization": f"Bearer {stack.key('acme')}"}
        api = httpx.Client(base_url=stack.base_url, headers=headers, timeout=30)
        hook = api.post("/v1/webhooks", json={"url": receiver.url, "event_types": [
            "fine_tuning.job.cancelled"]}).json()  # fmt: skip
        file_id = api.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(chat_rows(6)))},
            data={"purpose": "fine-tune"},
        ).json()["id"]  # fmt: skip
        job = api.post("/v1/fine_tuning/jobs", json={
            "model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 50}}
        ).json()  # fmt: skip
        api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        deliveries = f"/v1/webhooks/{hook['id']}/deliveries"

        def first_attempt_failed():
            data = api.get(deliveries).json()["data"]
            return data[0] if data and data[0]["attempts"] else None

        failed = poll("a first (refused) attempt", first_attempt_failed, stack)
        assert failed["status"] == "pending" and failed["attempts"][0]["status_code"] is None
        assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
        with receiving(receiver):
            poll("the delivery", lambda: receiver.requests or None, stack)
        shown = poll(
            "the delivery's record",
            lambda: (
                ((d := api.get(deliveries).json()["data"][0])["status"] == "delivered" and d)
                or None
            ),
            stack,
        )
    got = receiver.requests[0]
    assert got.headers["webhook-id"] == shown["id"] == failed["id"]
    event = Webhook(hook["secret"]).verify(got.body, got.headers)
    assert event["type"] == "fine_tuning.job.cancelled" and event["data"] == {"id": job["id"]}
    sdk = openai.OpenAI(api_key="unused", base_url=f"{stack.base_url}/v1")
    assert sdk.webhooks.unwrap(got.body, got.headers, secret=hook["secret"]).data.id == job["id"]
    assert [a["status_code"] for a in shown["attempts"]][-1] == 200
