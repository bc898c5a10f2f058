"""Inference load of one tenant, seen from another, through real uvicorn on loopback
(issue 14, findings 5 and 12).

Before, each completion and each open stream held a thread of the pool that every sync
route shares (authentication included) for as long as it ran: 50 open streams of one
tenant made the others' requests and /health wait. Now inference waits on the event loop;
an organization past its limit of running + waiting requests gets 429; a stream whose key
is revoked ends with an error event within a few seconds.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack
from urllib.parse import urlparse

import httpx
import pytest

pytest.importorskip("torch")

from app import tenancy
from app.db.models import ApiKey
from app.db.session import session_scope
from app.inference import engine as engine_module
from app.inference.scheduler import BaseScheduler
from tests.api.conftest import api_key
from tests.e2e.stack import serving
from tests.factories import api_app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("enqueued")]  # loads the model
# Before, a request waiting for room in the batch held a thread of the shared pool (40)
# until it was admitted: 60 streams leave more than 40 of them waiting behind 16 rows.
STREAMS = 60


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long generations: every decode step takes 50 ms more and no EOS ends a row early, so
    a 500-token stream stays open for over 25 s, longer than the test needs."""
    real = BaseScheduler._step

    def step(self):
        time.sleep(0.05)
        real(self)

    monkeypatch.setattr(BaseScheduler, "_step", step)
    monkeypatch.setattr(engine_module, "eos_token_ids", lambda *_: frozenset())


def open_stream(base_url: str, key: str) -> socket.socket:
    """A streaming chat request, sent and left open (its answer is never read)."""
    url = urlparse(base_url)
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=15)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Content-Type: application/json\r\n\r\n"
        + body
    )
    return sock


def wait_admitted(client: httpx.Client, key: str, count: int) -> None:
    """Until the engine holds `count` of this tenant's requests (bounded)."""
    for _ in range(200):
        view = client.get("/v1/engine/adapters", headers={"Authorization": f"Bearer {key}"})
        bases = view.json()["base_models"]
        if bases and bases[0]["running"] + bases[0]["waiting"] >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the engine never held {count} requests: {view.text}")


@pytest.mark.usefixtures("slow_steps")
def test_open_streams_of_one_tenant_leave_the_others_served(settings):
    settings.rate_limit_per_second, settings.max_inference_requests_per_org = 0, 0
    attacker, victim = api_key(settings, "attacker"), api_key(settings, "victim")
    with serving(api_app(settings)) as base_url, ExitStack() as streams:
        with httpx.Client(base_url=base_url, timeout=20) as client:
            for _ in range(STREAMS):
                streams.enter_context(open_stream(base_url, attacker))
            wait_admitted(client, attacker, STREAMS)
            files = client.get("/v1/files", headers={"Authorization": f"Bearer {victim}"})
            health = client.get("/health")
            view = client.get("/v1/engine/adapters", headers={"Authorization": f"Bearer {victim}"})
    assert files.status_code == 200 and health.status_code == 200
    base = view.json()["base_models"][0]
    assert (base["running"], base["waiting"]) == (0, 0)  # not the attacker's 60


@pytest.mark.usefixtures("slow_steps")
def test_past_its_inference_limit_an_organization_gets_429(settings):
    settings.rate_limit_per_second, settings.max_inference_requests_per_org = 0, 3
    attacker = api_key(settings, "attacker")
    with serving(api_app(settings)) as base_url, ExitStack() as streams:
        with httpx.Client(base_url=base_url, timeout=20) as client:
            for _ in range(3):
                streams.enter_context(open_stream(base_url, attacker))
            wait_admitted(client, attacker, 3)
            fourth = client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {attacker}"},
            )
    assert fourth.status_code == 429, fourth.text
    assert int(fourth.headers["Retry-After"]) >= 1
    assert fourth.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.usefixtures("slow_steps")
def test_a_stream_ends_soon_after_its_key_is_revoked(settings):
    settings.stream_key_check_seconds = 0.2
    key = api_key(settings, "acme")
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 900, "stream": True}
    events: list[str] = []
    with serving(api_app(settings)) as base_url, httpx.Client(timeout=60) as client:
        headers = {"Authorization": f"Bearer {key}"}
        with client.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: ") :])
                if len(events) == 1:
                    revoke(settings, key)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "invalid_api_key", error
    assert len(events) < 900


def revoke(settings, secret: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        key = session.query(ApiKey).filter_by(key_hash=tenancy.hash_key(secret)).one()
        tenancy.revoke_key(session, key_id=key.id)
