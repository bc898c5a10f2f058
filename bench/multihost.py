"""Issue 13 §4 at full size: 3 worker hosts and 2 API hosts simulated on loopback.

Each process has a data dir and a temp dir of its own; nothing is shared but PostgreSQL
(a fresh database on 127.0.0.1:5432), a private Redis and a moto S3 server (both started
here, on free loopback ports). 50 jobs of the tiny model (8 examples, 8 steps, a 0.15 s
pause after each step so kills land mid-training) go in alternately through both APIs, at
most one per worker host in flight; 10 of them are `kill -9`ed once mid-training
(alternately the worker's pool child and its master, restarted). Prints, last: jobs
lost and trained twice, adapters callable on each API host, dispatch latency (submit →
running, p50/p99), jobs per worker host, and the rows PostgreSQL wrote and the commands
Redis ran per job. The test (tests/chaos/test_multihost.py) runs the same at a few jobs.

    .venv/bin/python -m bench.multihost [--jobs 50] [--kills 10]

One torch thread per process (OMP_NUM_THREADS=1): five processes and their job children
share the machine. Several minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.tiny_model import build_tiny_model
from bench.load_api import postgres_env
from tests.chaos.harness import RedisServer, assert_never_two_attempts_at_once, open_stack
from tests.chaos.multihost import HOSTS_ENV, simulate
from tests.e2e.stack import free_port
from tests.object_store import moto_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-multihost-"))
    model_dir = build_tiny_model(tmp / "tiny-model")
    db_url = postgres_env(f"loraforge_multihost_{uuid.uuid4().hex[:8]}")["LORAFORGE_DATABASE_URL"]
    redis = RedisServer(tmp / "redis")
    redis.start()
    try:
        with moto_server(free_port(), tmp / "moto.log") as s3:
            env = HOSTS_ENV | s3.env | {"LORAFORGE_STORAGE_URL": s3.storage_url()}
            stack = open_stack(tmp / "stack", model_dir, db_url, redis, **env)
            try:
                result = simulate(stack, jobs=args.jobs, kills=args.kills)
                assert_never_two_attempts_at_once(stack)
            finally:
                stack.stop()
    finally:
        redis.kill()
    print(f"logs and journal under {tmp}")
    print(result.summary())
    if result.lost or result.trained_twice or min(result.callable.values()) < args.jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()
