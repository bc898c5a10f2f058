"""Real processes for fault tests: a private Redis, the API (uvicorn + sweeper), workers.

Nothing shared is ever killed: Redis runs on a free port of its own (no persistence, so
a restart loses every message), workers and the API are children of the test, and the
database is the test's own PostgreSQL database (`pg_database_url`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import select

from app.db.models import Adapter, Job
from app.db.session import session_scope
from tests.e2e.stack import free_port, stack_env, tail_logs, wait_healthy

REPO = Path(__file__).resolve().parents[2]
FULL = os.environ.get("LORAFORGE_CHAOS_FULL") == "1"
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + ("\n" + tail_logs(logs) if logs else "")
    )


def assert_never_two_attempts_at_once(stack: ChaosStack) -> None:
    """In each job's step journal (time order), an attempt never steps after a later one."""
    by_job: dict[str, list[int]] = {}
    for entry in sorted(stack.journal("step"), key=lambda e: e["t"]):
        by_job.setdefault(entry["job"], []).append(entry["attempt"])
    for job_id, attempts in by_job.items():
        assert attempts == sorted(attempts), (job_id, attempts)


class RedisServer:
    """redis-server on a free loopback port, no RDB, no AOF: a kill loses all messages."""

    def __init__(self, workdir: Path):
        self.workdir, self.port, self.proc = workdir, free_port(), None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=open(self.workdir / "redis.log", "a"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: _pings(client), 20, "redis to answer PING")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: nothing is saved
            self.proc.wait()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class Worker:
    """One `celery worker -c 1` (prefork: a resident pool process that forks a child per
    job, worker/supervisor.py) with the chaos journal."""

    def __init__(self, env: dict[str, str], logs: Path, name: str):
        self.env, self.logs, self.name, self.proc = env, logs, name, None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.logs / f"worker-{self.name}-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.chaos.fault_worker",
                "worker",
                "-c",
                "1",
                "-Q",
                "training",
                "--pool=prefork",
                "--loglevel=INFO",
                "-n",
                f"{self.name}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill_child(self) -> int:
        """SIGKILL the pool process; the job's child dies with it (it sets PDEATHSIG)."""
        [child] = wait_until(self.children, 30, "the worker's pool child")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        return child.pid

    def kill_master(self) -> None:
        """SIGKILL the master; its pool child gets SIGKILL too (billiard sets PDEATHSIG)."""
        children = self.children()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        psutil.wait_procs(children, timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for child in psutil.wait_procs(children, timeout=10)[1]:
            child.kill()


class ChaosStack:
    """The API (with its sweeper) and N workers over Redis + PostgreSQL, on short timers."""

    def __init__(self, tmp: Path, model_dir: Path, db_url: str, redis: RedisServer, **env: str):
        self.tmp, self.db_url, self.redis = tmp, db_url, redis
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.journal_path = tmp / "journal.jsonl"
        # the processes' system temp dir, private to the test, so what they leave there shows
        self.system_tmp = tmp / "system-tmp"
        self.system_tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        timers = {
            "LORAFORGE_LEASE_SECONDS": "3",
            "LORAFORGE_SWEEP_INTERVAL_SECONDS": "1",
            "LORAFORGE_REQUEUE_AFTER_SECONDS": "4",
            "LORAFORGE_MAX_ATTEMPTS": "5",
            "LORAFORGE_MAX_ACTIVE_JOBS": "0",
            "LORAFORGE_RATE_LIMIT_PER_SECOND": "0",
            "LORAFORGE_INFERENCE_ENABLED": "false",
        }
        self.env = stack_env(
            tmp / "data",
            model_dir,
            LORAFORGE_DATABASE_URL=db_url,
            LORAFORGE_BROKER_URL=redis.url,
            LORAFORGE_CHAOS_JOURNAL=str(self.journal_path),
            PYTHONPATH=str(REPO),
            TMPDIR=str(self.system_tmp),
            **(timers | env),
        )
        self.api: subprocess.Popen | None = None
        self.extra_apis: list[subprocess.Popen] = []
        self.workers: list[Worker] = []
        self.http = httpx.Client(base_url=self.base_url, timeout=30)
        self.clients: list[httpx.Client] = []  # of the extra APIs

    # -- processes -------------------------------------------------------------------------
    def host_env(self, host: str) -> dict[str, str]:
        """The environment of a process on a machine of its own: a data dir (scratch, the
        adapter cache) and a system temp dir that no other process sees."""
        data_dir = self.tmp / "hosts" / host
        (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
        return self.env | {
            "LORAFORGE_DATA_DIR": str(data_dir),
            "TMPDIR": str(data_dir / "tmp"),
            "LORAFORGE_CHAOS_HOST": host,
        }

    def _spawn_api(self, env: dict[str, str], port: int, log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "a")
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(f"http://127.0.0.1:{port}", [process], self.logs)
        return process

    def start_api(self) -> None:
        self.api = self._spawn_api(self.env, self.port, "api.log")

    def add_api(self, host: str) -> httpx.Client:
        """One more API (with its sweeper) on a host of its own; a client for it, with the
        stack's key."""
        port = free_port()
        self.extra_apis.append(self._spawn_api(self.host_env(host), port, f"api-{host}.log"))
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        client.headers["Authorization"] = self.http.headers["Authorization"]
        self.clients.append(client)
        return client

    def add_worker(self, name: str, *, own_host: bool = False) -> Worker:
        """A worker on the stack's machine, or (`own_host`) on a machine of its own."""
        worker = Worker(self.host_env(name) if own_host else self.env, self.logs, name)
        worker.start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for api in [self.api, *self.extra_apis]:
            if api and api.poll() is None:
                api.send_signal(signal.SIGTERM)
                try:
                    api.wait(30)
                except subprocess.TimeoutExpired:
                    api.kill()
        for client in [self.http, *self.clients]:
            client.close()

    # -- the API, as a client --------------------------------------------------------------
    def login(self, org: str = "acme") -> None:
        from app import tenancy

        with session_scope(self.db_url) as session:
            organization = tenancy.get_or_create_organization(session, name=org)
            key = tenancy.create_api_key(session, organization=organization)
        self.http.headers["Authorization"] = f"Bearer {key}"

    def upload(self, rows: list[dict], client: httpx.Client | None = None) -> str:
        """Through the stack's API, or `client`'s (another API host)."""
        content = "".join(json.dumps(row) + "\n" for row in rows).encode()
        response = (client or self.http).post(
            "/v1/files", files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def create_job(
        self, file_id: str, client: httpx.Client | None = None, **hyperparameters: Any
    ) -> httpx.Response:
        # no packing: one example per sequence, so a job's step count is known in advance
        hyperparameters = {"packing": False} | hyperparameters
        body = {
            "model": "tiny",
            "training_file": file_id,
            "suffix": "chaos",
            "seed": 7,
            "hyperparameters": hyperparameters,
        }
        return (client or self.http).post("/v1/fine_tuning/jobs", json=body)

    def submit(self, file_id: str, n: int, **hyperparameters: Any) -> list[str]:
        ids = []
        for _ in range(n):
            response = self.create_job(file_id, **hyperparameters)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        return ids

    # -- the database and the journal: what really happened --------------------------------
    def jobs(self, ids: Iterable[str]) -> dict[str, Job]:
        with session_scope(self.db_url) as session:
            return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}

    def jobs_of_org(self) -> list[str]:
        """Every job id in the database (each test has a database of its own)."""
        with session_scope(self.db_url) as session:
            return list(session.scalars(select(Job.id)))

    def adapters(self, ids: Iterable[str]) -> list[Adapter]:
        with session_scope(self.db_url) as session:
            return list(session.scalars(select(Adapter).where(Adapter.job_id.in_(list(ids)))))

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, Job]:
        def done() -> dict[str, Job] | None:
            jobs = self.jobs(ids)
            return jobs if all(job.status in TERMINAL for job in jobs.values()) else None

        return wait_until(done, timeout, f"{len(ids)} jobs to finish", self.logs)

    def journal(self, kind: str | None = None) -> list[dict]:
        if not self.journal_path.exists():
            return []
        lines = [json.loads(line) for line in self.journal_path.read_text().splitlines()]
        return [line for line in lines if kind is None or line["kind"] == kind]

    def last_step(self, job_id: str) -> int:
        steps = [e["step"] for e in self.journal("step") if e["job"] == job_id]
        return max(steps, default=0)


def open_stack(
    tmp: Path, model_dir: Path, db_url: str, redis: RedisServer, **env: str
) -> ChaosStack:
    """A migrated stack, its API started and logged in; workers are added by the caller."""
    from app import migrate
    from app.config import Settings

    migrate.upgrade(Settings(data_dir=tmp / "data", database_url=db_url))
    stack = ChaosStack(tmp, model_dir, db_url, redis, **env)
    try:
        stack.start_api()
        stack.login()
    except BaseException:
        stack.stop()
        raise
    return stack
