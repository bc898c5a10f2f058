"""A real S3 protocol server on loopback for the object-store tests: moto's server
(`moto[server]`), started by the `s3_server` fixture on 127.0.0.1 and a free port, so the
tests need nothing running beforehand. Its data lives in its memory: stopping it (not
pausing it with SIGSTOP) loses everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

BUCKET = "loraforge-test"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS settings that point any client (s3fs, boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_url(self) -> str:
        """A fresh prefix in the test bucket: each test sees an empty store."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@contextmanager
def moto_server(port: int, log: Path) -> Iterator[S3Server]:
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", process=process)
    try:
        _wait_up(server, log)
        httpx.put(f"{server.endpoint}/{BUCKET}", timeout=10).raise_for_status()  # the bucket
        yield server
    finally:
        os.kill(process.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_up(server: S3Server, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("moto_server exited:\n" + log.read_text()[-2000:])
        try:
            httpx.get(server.endpoint, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("moto_server did not start:\n" + log.read_text()[-2000:])
