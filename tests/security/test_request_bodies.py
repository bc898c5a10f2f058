"""Slow and oversized request bodies (issue 14, finding 1 and 4).

A client that sends headers and one line of an upload, then stalls, must cost the server no
database connection: before, authentication's session stayed open while the route waited
for the body, and ~30 such sockets exhausted the pool, so every request of every tenant
answered 500. A body that stalls is answered 408 and dropped; pool exhaustion answers 503
with Retry-After; a JSON body past its cap is refused 413 while it streams.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from urllib.parse import urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from app.db.session import get_engine
from tests.api.conftest import api_key
from tests.e2e.stack import serving
from tests.factories import api_app

STALLED = 20  # more than SQLite's pool (5 + 10 overflow) holds


def stalled_upload(base_url: str, key: str) -> socket.socket:
    """Headers and the first line of a multipart upload, then nothing."""
    url = urlparse(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=15)
    sock.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        b"Content-Length: 100000\r\n\r\n--xyz\r\n"
    )
    return sock


@pytest.mark.usefixtures("enqueued")
def test_stalled_uploads_leave_other_tenants_served(settings):
    settings.rate_limit_per_second = 0
    settings.body_idle_timeout_seconds = 120  # they stay open through the victim's requests
    attacker, victim = api_key(settings, "attacker"), api_key(settings, "victim")
    with serving(api_app(settings)) as base_url, ExitStack() as sockets:
        for _ in range(STALLED):
            sockets.enter_context(stalled_upload(base_url, attacker))
        time.sleep(1)  # let every stalled request reach its route
        with httpx.Client(base_url=base_url, timeout=20) as client:
            files = client.get("/v1/files", headers={"Authorization": f"Bearer {victim}"})
            health = client.get("/health")
    assert files.status_code == 200, files.text
    assert health.status_code == 200, health.text


@pytest.mark.usefixtures("enqueued")
def test_a_stalled_body_is_answered_408_and_dropped(settings):
    settings.body_idle_timeout_seconds = 1
    with serving(api_app(settings)) as base_url:
        with stalled_upload(base_url, api_key(settings, "attacker")) as sock:
            answer = b""
            while chunk := sock.recv(4096):  # ends when the server closes the connection
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in head.lower()
    assert b'"code":"request_timeout"' in body


@pytest.mark.usefixtures("enqueued")
def test_a_trickling_json_body_is_dropped(settings):
    """Below the minimum rate (one byte at a time), not only when idle."""
    settings.body_idle_timeout_seconds, settings.body_min_bytes_per_second = 1, 1000
    with serving(api_app(settings)) as base_url:
        url = urlparse(base_url)
        with socket.create_connection((url.hostname, url.port), timeout=15) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            answer = b""
            for _ in range(200):  # a byte every 0.05 s: well below 1000 bytes/s
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                time.sleep(0.05)
                sock.settimeout(0.01)
                try:
                    answer += sock.recv(4096)
                except TimeoutError:
                    continue
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_pool_exhaustion_answers_503_with_retry_after(client, settings):
    pool = get_engine(settings.sqlalchemy_url).pool
    capacity = pool.size() + pool._max_overflow
    with ExitStack() as held:
        for _ in range(capacity):  # every pooled connection taken, as stalled requests did
            held.enter_context(get_engine(settings.sqlalchemy_url).connect())
        response = client.get("/v1/files")
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "service_unavailable"


@pytest.mark.usefixtures("enqueued")
@pytest.mark.parametrize("chunked", [False, True])
def test_json_body_past_its_cap_is_413(settings, chunked):
    settings.max_request_bytes = 64 * 1024
    body = b'{"model": "tiny", "prompt": "' + b"x" * (2 * settings.max_request_bytes) + b'"}'
    pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    with TestClient(api_app(settings)) as client:
        response = client.post(
            "/v1/completions",
            content=iter(pieces) if chunked else body,  # chunked: no Content-Length
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {api_key(settings, 'acme')}",
            },
        )
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
