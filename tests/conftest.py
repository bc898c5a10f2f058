"""Shared fixtures: a tiny local base model, migrated databases, one torch thread.

Test data (bodies, uploads, jobs, adapters) is made in tests/factories.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get(
    "LORAFORGE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LORAFORGE_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local base model, built once per run (`loraforge tiny-model` writes the same)."""
    from app.ml.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """A tiny model gains nothing from intra-op threads; on a busy machine they cost 20x.

    Modules that serve the tiny model ask for it (`pytest.mark.usefixtures`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_settings(data_dir: Path, model_dir: Path, **overrides):
    from app.config import Settings

    values = {
        "data_dir": data_dir,
        "base_models": {"tiny": str(model_dir)},
        "sweep_interval_seconds": 0,
        "metrics_every_steps": 1,
        "device": "cpu",
    }
    return Settings(**(values | overrides))


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path):
    from app import migrate

    settings = make_settings(tmp_path / "data", tiny_model_dir)
    migrate.upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def pg_admin() -> str:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:  # fail, never skip: these tests exist to run on PG
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_database_url(pg_admin: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"loraforge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    yield url
    from app.db.session import get_engine

    get_engine(url).dispose()
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path, tiny_model_dir):
    """Migrated settings on SQLite and on PostgreSQL: a test that takes it runs on both."""
    from app import migrate

    url = request.getfixturevalue("pg_database_url") if request.param == "postgres" else None
    settings = make_settings(tmp_path / "data", tiny_model_dir, database_url=url)
    migrate.upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 protocol server (moto) on loopback, for this test session."""
    from tests.e2e.stack import free_port
    from tests.object_store import moto_server

    with moto_server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_storage_url(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty prefix on the S3 server, with this process's AWS settings pointing there."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.storage_url()
