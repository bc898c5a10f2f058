"""Fixtures for fault tests: a private Redis and the real stack on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosStack, RedisServer, open_stack
from tests.chaos.pg_cluster import PostgresCluster


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def storage_env(request) -> dict[str, str]:
    """Where the stack keeps artifacts: the local data dir, or (a test parametrized
    `indirect` with "s3") a prefix on a moto S3 server on loopback."""
    if getattr(request, "param", "local") == "s3":
        return {"LORAFORGE_STORAGE_URL": request.getfixturevalue("s3_storage_url")}
    return {}


@pytest.fixture
def make_stack(
    tmp_path, tiny_model_dir, pg_database_url, redis_server, storage_env
) -> Iterator[Callable]:
    """Build a migrated stack (API started, logged in); workers are added by the test."""
    stacks: list[ChaosStack] = []

    def make(db_url: str | None = None, **env: str) -> ChaosStack:
        stack = open_stack(
            tmp_path, tiny_model_dir, db_url or pg_database_url, redis_server, **(storage_env | env)
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.stop()
