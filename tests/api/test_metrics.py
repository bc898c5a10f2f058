"""GET /metrics (issue 11 §4): the admin key only, parsed by prometheus-client's parser, and
its inference series move when a completion runs on an adapter or on the bare base."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("torch")

from app.inference import engine as engine_module
from app.observability import metrics
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import PROMPT, api_app, publish_adapter, submit
from tests.metrics_text import labels_of, samples, value

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ADMIN = "adm-" + "m3tr1c" * 7
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def admin_settings(settings):
    return make_settings(
        settings.data_dir, settings.base_models["tiny"], admin_key=ADMIN, database_url=None
    )


@pytest.fixture
def app_client(admin_settings, enqueued):  # noqa: ARG001 (no broker)
    with TestClient(api_app(admin_settings)) as client:
        yield client


def scrape(client) -> dict:
    answer = client.get("/metrics", headers=ADMIN_HEADERS)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return samples(answer.text)


def test_metrics_take_the_admin_key_only(app_client, admin_settings):
    tenant = {"Authorization": f"Bearer {api_key(admin_settings, 'acme')}"}
    assert app_client.get("/metrics", headers=tenant).status_code == 403
    assert app_client.get("/metrics").status_code == 401
    assert app_client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert ("loraforge_jobs", frozenset({("status", "queued")})) in scrape(app_client)


def test_the_jobs_gauge_counts_the_database_by_status(app_client, admin_settings):
    before = value(scrape(app_client), "loraforge_jobs", status="queued")
    submit(admin_settings)
    submit(admin_settings)
    assert value(scrape(app_client), "loraforge_jobs", status="queued") == before + 2


def test_a_completion_moves_its_adapters_series(
    app_client, admin_settings, tiny_model_dir, monkeypatch
):
    monkeypatch.setattr(engine_module, "eos_token_ids", lambda *_: frozenset())  # no early end
    # the labels are the process's: adapters of earlier tests may hold all N of them
    fresh = metrics.AdapterLabels(metrics.adapter_labels.limit)
    monkeypatch.setattr(metrics, "adapter_labels", fresh)
    adapter = publish_adapter(admin_settings, tiny_model_dir, org="acme", suffix="m", seed=5)
    tenant = {"Authorization": f"Bearer {api_key(admin_settings, 'acme')}"}
    before = scrape(app_client)
    usage = {}
    for model in (adapter, "tiny"):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        answer = app_client.post("/v1/completions", json=body, headers=tenant)
        assert answer.status_code == 200, answer.text
        usage[model] = answer.json()["usage"]
    after = scrape(app_client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for model, label in ((adapter, adapter), ("tiny", metrics.NO_ADAPTER)):
        series = {"base_model": "tiny", "adapter": label}
        assert moved("loraforge_inference_requests_total", **series) == 1
        assert (
            moved("loraforge_inference_prompt_tokens_total", **series)
            == (usage[model]["prompt_tokens"])
        )
        assert moved("loraforge_inference_completion_tokens_total", **series) == 4
        assert moved("loraforge_inference_time_to_first_token_seconds_count", **series) == 1
        assert moved("loraforge_inference_time_per_output_token_seconds_count", **series) == 1
    cache = {"base_model": "tiny", "adapter": adapter}
    assert moved("loraforge_adapter_cache_events_total", **cache, event="miss") == 1
    assert moved("loraforge_adapter_cache_events_total", **cache, event="load") == 1
    assert value(after, "loraforge_adapter_resident", **cache) == 1
    assert moved("loraforge_inference_batch_size_count", base_model="tiny") >= 6  # 3 steps each
    assert "tiny" in labels_of(after, "loraforge_inference_waiting_requests", "base_model")
