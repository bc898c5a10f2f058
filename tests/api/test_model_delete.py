"""Deleting a model removes what it learned: its checkpoints stop answering too.

A fine-tuned model's checkpoints (`ft:…:ckpt-step-N`) are models of their own: callable and
downloadable. Deleting the model deletes them (rows, files, loaded weights); a checkpoint id
can be deleted on its own; GET and DELETE agree on what exists.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sqlalchemy import select  # noqa: E402

from app.db.models import Adapter, Checkpoint, Job  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.registry import service as registry  # noqa: E402
from app.storage import LocalStore  # noqa: E402
from tests.factories import (  # noqa: E402
    commit_fails,
    complete,
    publish_adapter,
    publish_checkpoint,
)


@pytest.fixture
def model_with_checkpoints(settings, tiny_model_dir):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="gone", seed=1)
    steps = [publish_checkpoint(settings, tiny_model_dir, adapter, step=s, seed=s) for s in (2, 4)]
    return adapter, steps


def stored(settings, model_id: str) -> bool:
    """Whether the files of this adapter or checkpoint are still in the store."""
    store = LocalStore(settings.artifacts_dir)
    with session_scope(settings.sqlalchemy_url) as session:
        if ":ckpt-step-" in model_id:
            job_id, step = model_id.split(":")[4], model_id.rsplit("-", 1)[1]
            return store.path(f"checkpoints/{job_id}/step-{step}").exists()
        return store.path(session.get_one(Adapter, model_id).storage_key).exists()


def assert_gone(client, model_id: str) -> None:
    """Not callable (JSON or streamed), not downloadable, not retrievable, not deletable."""
    for stream in (False, True):
        response = complete(client, model=model_id, max_tokens=2, stream=stream)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["param"] == "model"
    for response in (
        client.get(f"/v1/models/{model_id}/adapter"),
        client.get(f"/v1/models/{model_id}"),
        client.delete(f"/v1/models/{model_id}"),
    ):
        assert response.status_code == 404, response.text


def test_deleting_a_model_deletes_and_unloads_its_checkpoints(
    client, settings, model_with_checkpoints
):
    adapter, checkpoints = model_with_checkpoints
    for model in (adapter, *checkpoints):  # each is loaded in the engine and downloadable
        assert complete(client, model=model, max_tokens=2).status_code == 200
        assert client.get(f"/v1/models/{model}/adapter").status_code == 200
    loaded = {a["id"] for a in client.get("/v1/engine/adapters").json()["data"] if a["loaded"]}
    assert loaded == {adapter, *checkpoints}

    response = client.delete(f"/v1/models/{adapter}")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": adapter,
        "object": "model",
        "deleted": True,
        "deleted_checkpoints": sorted(checkpoints),
    }
    for model in (adapter, *checkpoints):
        assert_gone(client, model)
        assert not stored(settings, model)
    assert not any(a["loaded"] for a in client.get("/v1/engine/adapters").json()["data"])
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.scalars(select(Checkpoint)).all() == []


def test_get_and_delete_agree_on_a_checkpoint_id(
    client, other_client, settings, model_with_checkpoints
):
    adapter, (first, second) = model_with_checkpoints
    assert complete(client, model=first, max_tokens=2).status_code == 200
    assert other_client.delete(f"/v1/models/{first}").status_code == 404  # tenancy
    assert client.get(f"/v1/models/{first}").status_code == 200

    response = client.delete(f"/v1/models/{first}")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": first,
        "object": "model",
        "deleted": True,
        "deleted_checkpoints": [],
    }
    assert_gone(client, first)
    assert not stored(settings, first)
    # the model and its other checkpoint are untouched
    for model in (adapter, second):
        assert client.get(f"/v1/models/{model}").status_code == 200
        assert complete(client, model=model, max_tokens=2).status_code == 200
        assert stored(settings, model)
    assert client.delete(f"/v1/models/{adapter}").json()["deleted_checkpoints"] == [second]


def test_a_running_jobs_checkpoint_is_not_deleted_under_it(
    client, settings, model_with_checkpoints
):
    """Its checkpoints are the job's resume points and the worker prunes them: 409."""
    _, (first, _) = model_with_checkpoints
    with session_scope(settings.sqlalchemy_url) as session:
        job_id = session.scalar(
            select(Checkpoint.job_id).where(Checkpoint.fine_tuned_model_checkpoint == first)
        )
        session.get_one(Job, job_id).status = "running"
    response = client.delete(f"/v1/models/{first}")
    assert response.status_code == 409, response.text
    assert "running" in response.json()["error"]["message"]
    assert client.get(f"/v1/models/{first}").status_code == 200
    assert stored(settings, first)


def test_a_delete_that_does_not_commit_keeps_the_models_files(
    client, settings, model_with_checkpoints, monkeypatch
):
    """The files go only once the rows' deletion has committed: the model still answers."""
    from app.api.routes import models as models_routes

    adapter, checkpoints = model_with_checkpoints
    monkeypatch.setattr(models_routes, "commit", commit_fails)
    assert client.delete(f"/v1/models/{adapter}").status_code == 503
    for model in (adapter, *checkpoints):
        assert stored(settings, model)
        assert complete(client, model=model, max_tokens=2).status_code == 200


@pytest.mark.postgres
@pytest.mark.parametrize("second", ["the model", "its checkpoint"])
def test_concurrent_deletes_wait_for_each_other_postgres(
    tmp_path, tiny_model_dir, pg_database_url, second
):
    """The later delete waits on the row lock and then finds nothing: 404, never a 500."""
    import threading
    import time

    from sqlalchemy import text

    from app import migrate, tenancy
    from app.errors import NotFound
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "pg", tiny_model_dir, database_url=pg_database_url)
    migrate.upgrade(settings)
    model = publish_adapter(settings, tiny_model_dir, org="acme", suffix="race", seed=1)
    checkpoint = publish_checkpoint(settings, tiny_model_dir, model, step=2, seed=2)
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        org = tenancy.get_or_create_organization(session, name="acme")
    outcome: dict[str, str] = {}

    def delete_later() -> None:
        target = model if second == "the model" else checkpoint
        try:
            with session_scope(url) as session:
                registry.delete_model(session, organization=org, model_id=target)
            outcome["second"] = "deleted"
        except NotFound:
            outcome["second"] = "404"

    with session_scope(url) as session:  # the first delete, held open until B waits on it
        removed = registry.delete_model(session, organization=org, model_id=model)
        waiter = threading.Thread(target=delete_later)
        waiter.start()
        deadline = time.monotonic() + 30
        with session_scope(url) as probe:
            while time.monotonic() < deadline and not probe.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ):
                probe.rollback()
                time.sleep(0.05)
    waiter.join(timeout=30)
    assert outcome == {"second": "404"}
    assert removed.checkpoints == [checkpoint]
