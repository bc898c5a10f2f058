"""GET /v1/models/{id}/adapter: what a user downloads checks against the header and loads
with PEFT on their own machine (issue 10).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.ml.loading import load_base_model  # noqa: E402
from app.registry.download import adapter_archive, public_base_name  # noqa: E402
from app.storage import LocalStore  # noqa: E402
from tests.factories import publish_adapter  # noqa: E402


def download(client, model_id: str):
    response = client.get(f"/v1/models/{model_id}/adapter")
    assert response.status_code == 200, response.text
    return response


def test_the_header_is_the_sha256_of_the_bytes_sent(client, settings, tiny_model_dir):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="dl", seed=3)
    first = download(client, adapter)
    assert first.headers["X-Adapter-SHA256"] == hashlib.sha256(first.content).hexdigest()
    assert int(first.headers["Content-Length"]) == len(first.content)
    with zipfile.ZipFile(io.BytesIO(first.content)) as bundle:
        weights = bundle.read("adapter_model.safetensors")
    recorded = client.get(f"/v1/models/{adapter}").json()["sha256"]
    assert first.headers["X-Adapter-Weights-SHA256"] == hashlib.sha256(weights).hexdigest()
    assert recorded == first.headers["X-Adapter-Weights-SHA256"]
    second = download(client, adapter)  # the zip is built the same way every time
    assert second.content == first.content
    assert second.headers["X-Adapter-SHA256"] == first.headers["X-Adapter-SHA256"]


def test_the_download_names_the_base_publicly_and_loads_with_peft(
    client, settings, tiny_model_dir, tmp_path
):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="dl", seed=4)
    with zipfile.ZipFile(io.BytesIO(download(client, adapter).content)) as bundle:
        bundle.extractall(tmp_path / "unzipped")
    config = json.loads((tmp_path / "unzipped" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the allowlist name: a local path
    assert str(tiny_model_dir) not in json.dumps(config)

    base = load_base_model(tiny_model_dir, device="cpu")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "unzipped").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
    assert not torch.equal(ours, plain)  # the adapter's weights are in use


def test_the_stored_adapter_keeps_the_servers_path(client, settings, tiny_model_dir):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="dl", seed=5)
    download(client, adapter)
    store = LocalStore(settings.artifacts_dir)
    job_id = adapter.rsplit(":", 1)[1]
    stored = json.loads((store.path(f"adapters/{job_id}") / "adapter_config.json").read_text())
    assert stored["base_model_name_or_path"] == str(tiny_model_dir)


def test_changed_weights_are_the_same_500_at_download_and_inference(
    client, settings, tiny_model_dir, caplog
):
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="dl", seed=6)
    job_id = adapter.rsplit(":", 1)[1]
    weights = LocalStore(settings.artifacts_dir).path(f"adapters/{job_id}")
    blob = bytearray((weights / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (weights / "adapter_model.safetensors").write_bytes(bytes(blob))
    fetched = client.get(f"/v1/models/{adapter}/adapter")
    body = {"model": adapter, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answered = client.post("/v1/chat/completions", json=body)
    assert (fetched.status_code, answered.status_code) == (500, 500)
    assert fetched.json() == answered.json()  # one error, one message
    error = fetched.json()["error"]
    assert (error["code"], error["type"]) == ("integrity_error", "server_error")
    assert adapter in error["message"] and "sha256" in error["message"]
    # the failed load is logged with the adapter's name, not only answered
    assert any(adapter in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),  # a hub id: public
        ("gpt2", "gpt2"),
        ("/srv/models/llama", "mine"),  # a local path, even one missing here, never leaks
        ("./models/llama", "mine"),
        (None, "mine"),  # no longer in the allowlist
    ],
)
def test_public_base_name(ref, expected) -> None:
    assert public_base_name("mine", ref) == expected


def test_an_existing_local_directory_is_named_by_the_allowlist_name(tiny_model_dir) -> None:
    assert public_base_name("tiny", str(tiny_model_dir)) == "tiny"


def test_the_archive_carries_the_hub_id(tmp_path) -> None:
    (tmp_path / "adapters" / "x").mkdir(parents=True)
    (tmp_path / "adapters/x/adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/srv/models/qwen", "r": 8})
    )
    (tmp_path / "adapters/x/adapter_model.safetensors").write_bytes(b"weights")
    archive = adapter_archive(
        LocalStore(tmp_path), "adapters/x", base_model="Qwen/Qwen2.5-0.5B",
        weights_sha256=hashlib.sha256(b"weights").hexdigest(),
    )  # fmt: skip
    body = archive.body.read()
    assert hashlib.sha256(body).hexdigest() == archive.sha256 and len(body) == archive.size
    with zipfile.ZipFile(io.BytesIO(body)) as bundle:
        config = json.loads(bundle.read("adapter_config.json"))
        assert [i.date_time for i in bundle.infolist()] == [(1980, 1, 1, 0, 0, 0)] * 2
    assert config == {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "r": 8}
