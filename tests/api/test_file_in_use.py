"""A file a queued or running job reads cannot be deleted (409 naming the jobs), race-free."""

from __future__ import annotations

import threading

import pytest

from app import tenancy
from app.db.models import Job
from app.db.session import session_scope
from app.errors import InvalidRequest, InvalidState
from app.files import service as files
from app.jobs import service as jobs
from app.schemas.jobs import JobCreate
from app.storage import LocalStore
from tests.factories import chat_rows, jsonl, store_dataset, uploaded_file


@pytest.fixture
def settings(backend):
    """On SQLite and on PostgreSQL."""
    return backend


def set_status(settings, job_id: str, status: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).status = status


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_file_in_use_is_refused_with_409_naming_the_job(client, settings, field, status):
    used, other = uploaded_file(client), uploaded_file(client)
    body = {"model": "tiny", "training_file": other, field: used}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    set_status(settings, job, status)
    response = client.delete(f"/v1/files/{used}")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert (
        error["code"] == "file_in_use" and error["param"] == "file_id" and job in error["message"]
    )
    assert client.get(f"/v1/files/{used}/content").status_code == 200  # bytes kept too
    set_status(settings, job, "failed")  # once the job has ended, the file may go
    assert client.delete(f"/v1/files/{used}").status_code == 200


def test_other_organizations_jobs_are_not_counted_or_named(client, other_client):
    mine = uploaded_file(client)
    theirs = uploaded_file(other_client)
    other_client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": theirs})
    assert client.delete(f"/v1/files/{mine}").status_code == 200


def stored_file(settings, store: LocalStore) -> str:
    """A dataset of organization acme; the races below call the domain functions, no HTTP."""
    with session_scope(settings.sqlalchemy_url) as session:
        org = tenancy.get_or_create_organization(session, name="acme")
        return store_dataset(session, organization=org, store=store, content=jsonl(chat_rows(3))).id


def test_a_delete_racing_a_job_creation_never_leaves_the_job_without_its_file(settings) -> None:
    """The creation holds its (uncommitted) job while the delete runs: the delete must wait
    for it and then refuse, never delete the file under a job that is about to exist."""
    store, url = LocalStore(settings.artifacts_dir), settings.sqlalchemy_url
    file_id = stored_file(settings, store)
    outcome: list[BaseException | None] = []

    def delete() -> None:
        try:
            with session_scope(url) as session:
                organization = tenancy.get_or_create_organization(session, name="acme")
                files.delete_file(session, organization=organization, file_id=file_id)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    with session_scope(url) as session:
        organization = tenancy.get_or_create_organization(session, name="acme")
        request = JobCreate(model="tiny", training_file=file_id)
        jobs.create_job(
            session, organization=organization, request=request, base_models=settings.base_models
        )
        deleter = threading.Thread(target=delete)
        deleter.start()
        deleter.join(timeout=1.0)  # time to delete under the creation, were it not locked out
    deleter.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidState), outcome
    assert store.path(f"datasets/{file_id}.jsonl").is_file()


def test_a_job_created_on_a_file_being_deleted_is_refused(settings) -> None:
    store, url = LocalStore(settings.artifacts_dir), settings.sqlalchemy_url
    file_id = stored_file(settings, store)
    outcome: list[BaseException | None] = []

    def create() -> None:
        try:
            with session_scope(url) as session:
                organization = tenancy.get_or_create_organization(session, name="acme")
                request = JobCreate(model="tiny", training_file=file_id)
                jobs.create_job(
                    session, organization=organization, request=request,
                    base_models=settings.base_models,
                )  # fmt: skip
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    with session_scope(url) as session:
        organization = tenancy.get_or_create_organization(session, name="acme")
        files.delete_file(session, organization=organization, file_id=file_id)
        creator = threading.Thread(target=create)
        creator.start()
        creator.join(timeout=1.0)
    creator.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidRequest), outcome
    assert outcome[0].param == "training_file"
    with session_scope(url) as session:
        assert session.query(Job).count() == 0
