"""Replicas stay consistent through the registry (docs/design.md §2.1): an api replica A and
an inference-only replica B, each with its own data dir, share one PostgreSQL database and
one artifact store. What A publishes B serves at once; what A deletes (or retention prunes)
B refuses at once, and B's registry watch drops the weights it held."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402

from app import migrate  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.inference.registry_watch import drop_gone_adapters  # noqa: E402
from app.registry import service as registry  # noqa: E402
from tests.api.conftest import api_key  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.factories import api_app, complete, publish_adapter, publish_checkpoint  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def replicas(tmp_path, tiny_model_dir, pg_database_url) -> Iterator[tuple]:
    """(A's settings, A: api, B: serve), both signed in as organization acme."""
    store = f"file://{tmp_path / 'store'}"
    a, b = (
        make_settings(
            tmp_path / name, tiny_model_dir, database_url=pg_database_url, storage_url=store
        )
        for name in ("a", "b")
    )
    migrate.upgrade(a)
    key = api_key(a, "acme")
    with TestClient(api_app(a)) as on_a, TestClient(api_app(b, role="serve")) as on_b:
        for client in (on_a, on_b):
            client.headers["Authorization"] = f"Bearer {key}"
        yield a, on_a, on_b


def test_deleted_on_a_is_refused_on_b_and_dropped_there(replicas, tiny_model_dir) -> None:
    a, on_a, on_b = replicas
    adapter = publish_adapter(a, tiny_model_dir, org="acme", suffix="shared", seed=1)
    assert complete(on_b, model=adapter, max_tokens=2).status_code == 200  # at once on B
    engine_b = on_b.app.state.engine
    assert adapter in engine_b.held_adapters()

    assert on_a.delete(f"/v1/models/{adapter}").status_code == 200
    refused = complete(on_b, model=adapter, max_tokens=2)  # the next request, on B
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
    drop_gone_adapters(engine_b, a.sqlalchemy_url)  # what B's watch runs every ≤ 1 s
    assert adapter not in engine_b.held_adapters()


def test_a_checkpoint_pruned_through_a_is_refused_on_b(replicas, tiny_model_dir) -> None:
    a, _, on_b = replicas
    adapter = publish_adapter(a, tiny_model_dir, org="acme", suffix="ckpt", seed=2)
    steps = [publish_checkpoint(a, tiny_model_dir, adapter, step=s, seed=s) for s in (2, 4)]
    assert complete(on_b, model=steps[0], max_tokens=2).status_code == 200
    with session_scope(a.sqlalchemy_url) as session:
        job_id = steps[0].split(":")[4]
        registry.prune_checkpoints(session, job_id=job_id, keep=1)
    refused = complete(on_b, model=steps[0], max_tokens=2)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "checkpoint_pruned"
    assert drop_gone_adapters(on_b.app.state.engine, a.sqlalchemy_url) in ([steps[0]], [])
    assert steps[0] not in on_b.app.state.engine.held_adapters()
    assert complete(on_b, model=steps[1], max_tokens=2).status_code == 200  # kept: served
