"""Migrations round trip with data: upgrade → downgrade → upgrade, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from app import migrate, tenancy
from app.db import models
from app.db.base import Base, utcnow
from app.db.session import get_engine, session_scope
from tests.conftest import make_settings

FIRST = "0001"


def seed(url: str) -> None:
    """One row in every table, through the ORM at head."""
    with session_scope(url) as session:
        org = tenancy.get_or_create_organization(session, name="acme")
        tenancy.create_api_key(session, organization=org)
        session.add(models.File(
            id="file-1", organization_id=org.id, filename="t.jsonl", purpose="fine-tune",
            bytes=10, sha256="a" * 64, storage_key="datasets/file-1.jsonl", examples=2,
            format="chat",
        ))  # fmt: skip
        session.add(models.Job(
            id="ftjob-1", organization_id=org.id, model="tiny", training_file="file-1",
            hyperparameters={"n_epochs": 2}, seed=1, status="succeeded", result_files=[],
            metadata_={"k": "v"}, finished_at=utcnow(),
        ))  # fmt: skip
        session.flush()
        session.add(models.JobEvent(job_id="ftjob-1", message="hello", data={"step": 1}))
        session.add(models.Checkpoint(
            id="ftckpt-1", job_id="ftjob-1", organization_id=org.id, step_number=2,
            fine_tuned_model_checkpoint="ft:tiny:acme::ftjob-1:ckpt-step-2", metrics={},
            storage_key="checkpoints/ftjob-1/2", sha256="b" * 64,
        ))  # fmt: skip
        session.add(models.Adapter(
            id="ft:tiny:acme::ftjob-1", organization_id=org.id, base_model="tiny",
            job_id="ftjob-1", storage_key="adapters/ftjob-1", sha256="c" * 64, size_bytes=5,
            lora_config={"r": 8},
        ))  # fmt: skip
        session.add(models.IdempotencyKey(
            organization_id=org.id, endpoint="jobs", key="k1", request_sha256="d" * 64,
            object_id="ftjob-1",
        ))  # fmt: skip
        session.add(models.WebhookEndpoint(
            id="wh-1", organization_id=org.id, url="https://example.com/hook",
            event_types=["fine_tuning.job.succeeded"], secret="whsec_c2VjcmV0",
        ))  # fmt: skip
        session.flush()
        session.add(models.WebhookDelivery(
            id="msg-1", endpoint_id="wh-1", organization_id=org.id, event_id="evt-1",
            event_type="fine_tuning.job.succeeded", payload="{}", next_attempt_at=utcnow(),
        ))  # fmt: skip
        session.flush()
        session.add(models.WebhookAttempt(delivery_id="msg-1", status_code=500, error=None))


def checksums(url: str, columns: dict[str, list[str]]) -> dict[str, tuple[int, str]]:
    """Row count and a content hash of the given columns of each table."""
    result = {}
    with get_engine(url).connect() as conn:
        for table, cols in columns.items():
            select_list = ", ".join(f'"{c}"' for c in cols)
            rows = conn.execute(text(f'SELECT {select_list} FROM "{table}" ORDER BY 1')).all()
            result[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
    return result


def schema_columns(url: str) -> dict[str, list[str]]:
    inspector = inspect(get_engine(url))
    return {
        table: sorted(c["name"] for c in inspector.get_columns(table))
        for table in inspector.get_table_names()
        if table != "alembic_version"
    }


def schema_diff(url: str) -> list:
    with get_engine(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def round_trip(settings, down_to: str = FIRST) -> None:
    url = settings.sqlalchemy_url
    migrate.upgrade(settings)
    seed(url)
    migrate.downgrade(settings, down_to)
    first_columns = schema_columns(url)
    assert "idempotency_key" not in first_columns
    before = checksums(url, first_columns)
    assert all(count == 1 for count, _ in before.values()), before
    migrate.upgrade(settings)
    assert checksums(url, first_columns) == before  # every 0001 column kept its data
    assert schema_diff(url) == []


def empty_round_trip(settings) -> None:
    """head → base → head leaves the schema the models describe, and usable."""
    url = settings.sqlalchemy_url
    migrate.upgrade(settings)
    migrate.downgrade(settings, "base")
    assert schema_columns(url) == {}
    migrate.upgrade(settings)
    assert schema_diff(url) == []
    seed(url)


def test_round_trip_through_0003_sqlite(tmp_path: Path) -> None:
    round_trip(make_settings(tmp_path / "data", tmp_path / "no-model"), down_to="0002")


def test_empty_round_trip_sqlite(tmp_path: Path) -> None:
    empty_round_trip(make_settings(tmp_path / "data", tmp_path / "no-model"))


def test_round_trip_sqlite(tmp_path: Path) -> None:
    round_trip(make_settings(tmp_path / "data", tmp_path / "no-model"))


@pytest.mark.postgres
def test_round_trip_postgres(tmp_path: Path, pg_database_url: str) -> None:
    settings = make_settings(tmp_path / "data", tmp_path / "m", database_url=pg_database_url)
    round_trip(settings)
    migrate.downgrade(settings, "base")  # with data: PostgreSQL drops in dependency order
    empty_round_trip(settings)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_settings(request, tmp_path: Path):
    url = request.getfixturevalue("pg_database_url") if request.param == "postgres" else None
    return make_settings(tmp_path / "data", tmp_path / "m", database_url=url)


def test_events_stored_before_0005_get_opaque_ids_and_page(any_settings) -> None:
    from app.jobs import service as jobs

    url = any_settings.sqlalchemy_url
    migrate.upgrade(any_settings)
    seed(url)
    with session_scope(url) as session:
        for i in range(4):
            jobs.add_event(session, job_id="ftjob-1", message=f"e{i}")
    migrate.downgrade(any_settings, "0004")  # events as they were stored: seq only
    migrate.upgrade(any_settings)
    with session_scope(url) as session:
        org = session.query(models.Organization).one()
        rows = jobs.list_events(session, organization=org, job_id="ftjob-1", after=None, limit=9)
        ids = [jobs.event_id(row) for row in rows.rows]
        assert len(set(ids)) == 5 and all(re.fullmatch(r"ftevent-[0-9a-f]{24}", i) for i in ids)
        page = jobs.list_events(session, organization=org, job_id="ftjob-1", after=ids[1], limit=9)
        assert [jobs.event_id(row) for row in page.rows] == ids[2:]
