"""Upload cap while streaming (measured at the ASGI receive channel and in the spool)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest

from tests.api.conftest import api_key
from tests.factories import api_app, chat_rows, jsonl, stored_nothing

BOUNDARY = "lfboundary"
CHUNK = 64 * 1024


def spool_bytes(settings) -> int:
    return sum(p.stat().st_size for p in (settings.artifacts_dir / "tmp").rglob("*") if p.is_file())


def drive(app, settings, total: int, *, content_length: bool):
    """POST a `total`-byte file part in 64 KB chunks straight into the ASGI app.

    Returns (status, body, bytes the app pulled from the receive channel, peak spool size).
    """
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    line = jsonl(chat_rows(1))
    payload = head + line * (total // len(line)) + tail
    headers = [
        (b"authorization", f"Bearer {api_key(settings, 'acme')}".encode()),
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
    ]
    if content_length:
        headers.append((b"content-length", str(len(payload)).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
        "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        "root_path": "",
    }  # fmt: skip
    pulled, peak, sent = 0, 0, []

    async def receive() -> dict:
        nonlocal pulled, peak
        peak = max(peak, spool_bytes(settings))
        chunk = payload[pulled : pulled + CHUNK]
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": pulled < len(payload)}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled, max(peak, spool_bytes(settings))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Starlette's form parser would spill an upload here; ours must not touch it."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_chunked_upload_over_the_cap_stops_reading_and_spooling_at_the_cap(
    app, settings, private_tmp
):
    settings.max_upload_bytes = 256 * 1024
    status, body, pulled, peak = drive(app, settings, 20 * 1024 * 1024, content_length=False)
    assert status == 413 and body["error"]["code"] == "file_too_large"
    print(f"\nchunked 20 MiB upload, cap 256 KiB: received {pulled} B, peak spool {peak} B")
    assert pulled <= settings.max_upload_bytes + 2 * CHUNK  # not the 20 MiB that was offered
    assert peak <= settings.max_upload_bytes
    assert stored_nothing(settings) and not any(private_tmp.iterdir())


def test_upload_with_content_length_over_the_cap_is_refused_before_any_body_is_read(
    app, settings, private_tmp
):

    settings.max_upload_bytes = 256 * 1024
    (settings.artifacts_dir / "tmp").mkdir(parents=True, exist_ok=True)
    app = api_app(settings)  # the Content-Length check is built with the cap
    status, body, pulled, peak = drive(app, settings, 4 * 1024 * 1024, content_length=True)
    assert status == 413 and body["error"]["param"] == "file"
    assert pulled == 0 and peak == 0
    assert stored_nothing(settings) and not any(private_tmp.iterdir())


def test_upload_just_under_the_cap_is_stored(app, settings, private_tmp):
    settings.max_upload_bytes = 256 * 1024
    status, body, _, _ = drive(app, settings, 200 * 1024, content_length=False)
    assert status == 200, body
    assert body["bytes"] <= settings.max_upload_bytes and not any(private_tmp.iterdir())
