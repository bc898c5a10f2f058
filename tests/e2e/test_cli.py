"""The `loraforge` command as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import cli, free_port, stack_env, tail_logs, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def processes_with_data_dir(data_dir: Path) -> list[int]:
    """Live processes started with this LORAFORGE_DATA_DIR (the stack's children)."""
    marker = f"LORAFORGE_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_keys_create_prints_only_the_new_key(tmp_path, tiny_model_dir):
    env = stack_env(tmp_path / "data", tiny_model_dir)
    cli(env, "db", "upgrade")
    first, second = (
        cli(env, "keys", "create", "--org", "acme"),
        cli(env, "keys", "create", "--org", "acme"),
    )
    assert re.fullmatch(r"lf-[A-Za-z0-9_-]{40,}\n", first) and first != second
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--org", "Not Valid"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == "" and "organization names" in bad.stderr


def test_up_serves_and_ctrl_c_stops_api_and_worker(tmp_path, tiny_model_dir):
    data_dir, port = tmp_path / "data", free_port()
    env = stack_env(data_dir, tiny_model_dir)
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(logs / "up.log", "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", [up], logs)
            started = (logs / "up.log").read_text()
            assert f"loraforge data dir: {data_dir} (LORAFORGE_DATA_DIR)" in started
            assert "loraforge base models: tiny" in started
            assert len(processes_with_data_dir(data_dir)) >= 3  # up, api, worker (+ pool child)
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=60) == 0, tail_logs(logs)
        finally:
            if up.poll() is None:
                up.kill()
    assert processes_with_data_dir(data_dir) == [], tail_logs(logs)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
