"""GET /v1/admin/engine/cache: the KV cache across organizations, for the admin key only
(issue 15; issue 14: a tenant's own route never shows another organization's load)."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("torch")

from app.inference import engine as engine_module
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import PROMPT, api_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ADMIN = "adm-" + "c4che" * 8


@pytest.fixture
def admin_settings(settings):
    return make_settings(
        settings.data_dir, settings.base_models["tiny"], admin_key=ADMIN, database_url=None
    )


@pytest.fixture
def app_client(admin_settings, enqueued):  # noqa: ARG001
    with TestClient(api_app(admin_settings)) as client:
        yield client


def test_the_admin_sees_every_organizations_cache_use_a_tenant_cannot(
    app_client, admin_settings, monkeypatch
):
    monkeypatch.setattr(engine_module, "eos_token_ids", lambda *_: frozenset())  # no early end
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert app_client.get("/v1/admin/engine/cache", headers=admin).json()["data"] == []
    for org in ("acme", "globex"):
        tenant = {"Authorization": f"Bearer {api_key(admin_settings, org)}"}
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        answer = app_client.post("/v1/completions", json=body, headers=tenant)
        assert answer.status_code == 200, answer.text
    assert app_client.get("/v1/admin/engine/cache", headers=tenant).status_code == 403
    for _ in range(100):  # bounded: a row leaves the batch just after its answer is sent
        (base,) = app_client.get("/v1/admin/engine/cache", headers=admin).json()["data"]
        if base["running"] == 0:
            break
        threading.Event().wait(0.02)
    assert base["name"] == "tiny" and base["budget_tokens"] > 0
    # both organizations' decode steps were counted: 4 steps each after the prefill
    assert base["steps"] >= 4 and base["real"] > 0 and base["allocated"] >= base["padded"]
    assert (base["running"], base["waiting"], base["held_tokens"]) == (0, 0, 0)  # all freed
