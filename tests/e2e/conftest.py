"""The `stack` fixture: the real stack as a user starts it, on the embedded default
(`loraforge up`: SQLite + filesystem broker), on PostgreSQL + Redis (`loraforge api` +
`loraforge worker`), and on those with the artifacts in an S3 server (moto, on loopback) and
the api and the worker on data dirs of their own, as on two hosts that share nothing but
PostgreSQL, Redis and the store. Tests pick the variants with `indirect` parametrization."""

from __future__ import annotations

import pytest

from tests.conftest import REDIS_URL
from tests.e2e.stack import cli, free_port, running, stack_env


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("postgres-redis", marks=pytest.mark.postgres),
        pytest.param("postgres-redis-s3", marks=pytest.mark.postgres),
    ]
)
def stack(request, tmp_path, tiny_model_dir):
    port = free_port()
    if request.param == "embedded":
        env = stack_env(tmp_path / "data", tiny_model_dir)
        commands = [["up", "--port", str(port)]]
    else:
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        services = {
            "LORAFORGE_DATABASE_URL": request.getfixturevalue("pg_database_url"),
            "LORAFORGE_BROKER_URL": REDIS_URL,
        }
        if request.param.endswith("-s3"):
            services["LORAFORGE_STORAGE_URL"] = request.getfixturevalue("s3_storage_url")
        env = stack_env(tmp_path / "data", tiny_model_dir, **services)
        cli(env, "db", "upgrade")
        commands = [["api", "--port", str(port)], ["worker"]]
        if request.param.endswith("-s3"):  # two hosts: no directory in common
            hosts = [tmp_path / "api-host", tmp_path / "worker-host"]
            commands = [["--data-dir", str(h), *c] for h, c in zip(hosts, commands, strict=True)]
    with running(commands, env, tmp_path / "logs", port) as running_stack:
        yield running_stack
