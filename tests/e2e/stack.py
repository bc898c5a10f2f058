"""Start the real stack as a user would: the `loraforge` CLI in child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai


@dataclass
class Stack:
    base_url: str
    env: dict[str, str]
    logs: Path

    def key(self, org: str) -> str:
        return cli(self.env, "keys", "create", "--org", org).strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def stack_env(data_dir: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
    return (
        env
        | {
            "LORAFORGE_DATA_DIR": str(data_dir),
            "LORAFORGE_BASE_MODELS": f"tiny={model_dir}",
            "LORAFORGE_METRICS_EVERY_STEPS": "1",
            "LORAFORGE_DEVICE": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
        }
        | extra
    )


@contextmanager
def running(
    commands: list[list[str]],
    env: dict[str, str],
    logs: Path,
    port: int,
    cpus: list[set[int] | None] | None = None,
) -> Iterator[Stack]:
    """Run `loraforge` subcommands as children; stop them with SIGTERM (as Ctrl-C would).

    `cpus[i]`, when given, pins command i (and all it starts) to those CPUs from its first
    instruction, so the roles can be measured as if on machines of their own."""
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index, command in enumerate(commands):
        log = open(logs / f"{index}-{command[0]}.log", "w")
        pinned = cpus[index] if cpus else None
        pin = (lambda cores=pinned: os.sched_setaffinity(0, cores)) if pinned else None
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", *command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, children, logs)
        yield Stack(base_url=base_url, env=env, logs=logs)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def wait_healthy(base_url: str, children: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise RuntimeError("a stack process exited early:\n" + tail_logs(logs))
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the API did not become healthy:\n" + tail_logs(logs))


def tail_logs(logs: Path, lines: int = 40) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:])
        for log in sorted(logs.glob("*.log"))
    )


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Real uvicorn on 127.0.0.1, in a thread of this process (so monkeypatches apply)."""
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for(client: openai.OpenAI, job_id: str, stack: Stack, timeout: float = 300):
    """The job once finished (succeeded, failed or cancelled), polled through the SDK."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish:\n" + tail_logs(stack.logs))
