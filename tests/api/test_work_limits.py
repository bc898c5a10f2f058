"""Issue 14, finding 7: the work one request may ask for is bounded, and refused at once.

A job's tokens per optimizer step, its max_seq_length against the base model's context and
its n_epochs x examples; an organization's stored bytes (20 x 5 MB uploads were taken with
no limit), also under concurrent uploads.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from app import tenancy
from app.db.models import File
from app.db.session import new_session, session_scope
from app.errors import PayloadTooLarge
from app.storage import LocalStore
from tests.factories import chat_rows, create_job, job_count, jsonl, store_dataset, upload

ROWS = jsonl(chat_rows(12))  # the tiny model has 1024 positions


@pytest.fixture
def settings(settings):
    return settings.model_copy(
        update={"max_examples_per_job": 100, "max_stored_bytes_per_org": 3 * len(ROWS)}
    )


@pytest.fixture
def training_file(client) -> str:
    return upload(client, ROWS).json()["id"]


@pytest.mark.parametrize(
    ("hyperparameters", "param", "phrases"),
    [
        (
            {"max_seq_length": 4096},
            "hyperparameters.max_seq_length",
            ["max_seq_length 4096", "'tiny'", "1024 positions"],
        ),
        (
            {"batch_size": 256, "gradient_accumulation_steps": 1024, "max_seq_length": 1024},
            "hyperparameters",
            ["268435456 tokens per optimizer step", "at most 1048576"],
        ),
        (
            {"n_epochs": 9},
            "hyperparameters.n_epochs",
            ["9 * 12 = 108 examples", "at most 100 per job"],
        ),
    ],
)
def test_a_job_asking_for_unbounded_work_is_refused_naming_the_limit(
    client, settings, training_file, hyperparameters, param, phrases
):
    response = create_job(
        client, model="tiny", training_file=training_file, hyperparameters=hyperparameters
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert all(phrase in error["message"] for phrase in phrases), error["message"]
    assert job_count(settings) == 0


def test_work_within_the_bounds_is_accepted(client, training_file):
    hyperparameters = {"n_epochs": 8, "max_seq_length": 1024, "batch_size": 4}
    response = create_job(
        client, model="tiny", training_file=training_file, hyperparameters=hyperparameters
    )
    assert response.status_code == 200, response.text


def test_the_validation_set_counts_once_per_checkpoint(client, settings, training_file):
    """Each checkpoint evaluates the whole validation set: 8 * 12 training examples fit the
    bound of 100, but not with 2 checkpoints * 12 validation examples on top."""
    body = {"model": "tiny", "training_file": training_file, "validation_file": training_file}
    response = create_job(client, **body, hyperparameters={"n_epochs": 8, "n_checkpoints": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "hyperparameters.n_epochs"
    assert "8 * 12 + 2 * 12 = 120 examples" in error["message"], error["message"]
    assert "(n_checkpoints + n_evals) * validation examples" in error["message"]
    assert job_count(settings) == 0
    response = create_job(client, **body, hyperparameters={"n_epochs": 7, "n_checkpoints": 1})
    assert response.status_code == 200, response.text  # 7 * 12 + 1 * 12 = 96


def test_uploads_past_the_storage_quota_are_refused_for_that_organization_only(
    client, other_client, settings
):
    assert [upload(client, ROWS).status_code for _ in range(3)] == [200] * 3
    response = upload(client, ROWS)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "storage_quota_exceeded" and error["param"] == "file"
    assert f"take {3 * len(ROWS)} bytes" in error["message"]
    assert f"storage quota of {3 * len(ROWS)} bytes" in error["message"]
    assert len(client.get("/v1/files").json()["data"]) == 3  # nothing of it stored:
    # the bytes went to the store before the row was refused, and were deleted again
    assert len(list((settings.artifacts_dir / "datasets").iterdir())) == 3
    assert upload(other_client, ROWS).status_code == 200
    client.delete(f"/v1/files/{client.get('/v1/files').json()['data'][0]['id']}")
    assert upload(client, ROWS).status_code == 200  # deleting makes room


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, settings):
    if request.param == "sqlite":
        return settings
    from app import migrate

    pg = settings.model_copy(update={"database_url": request.getfixturevalue("pg_database_url")})
    migrate.upgrade(pg)
    return pg


def store(session, organization, tmp_path) -> File:
    return store_dataset(
        session, organization=organization, store=LocalStore(tmp_path / "store"),
        content=ROWS, max_stored_bytes=len(ROWS),
    )  # fmt: skip


def test_the_storage_quota_holds_under_concurrent_uploads(database, tmp_path):
    """Room for one file, two uploads at once: the second sees the first (it waits for the
    first's transaction) and is refused; without the lock both would read 0 bytes used."""
    with session_scope(database.sqlalchemy_url) as session:
        tenancy.get_or_create_organization(session, name="acme")
    first, second = new_session(database.sqlalchemy_url), new_session(database.sqlalchemy_url)
    acme = tenancy.get_or_create_organization(first, name="acme")
    store(first, acme, tmp_path)  # inserted, not yet committed
    outcome: list[object] = []

    def upload_second() -> None:
        try:
            org = tenancy.get_or_create_organization(second, name="acme")
            outcome.append(store(second, org, tmp_path))
            second.commit()
        except PayloadTooLarge as refused:
            outcome.append(refused)
            second.rollback()

    racer = threading.Thread(target=upload_second)
    racer.start()
    racer.join(2)  # it blocks on the first's lock; without one it would finish here
    first.commit()
    racer.join(30)
    first.close(), second.close()
    assert len(outcome) == 1 and isinstance(outcome[0], PayloadTooLarge)
    with session_scope(database.sqlalchemy_url) as session:
        assert session.scalar(select(func.count()).select_from(File)) == 1
