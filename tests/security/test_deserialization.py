"""Deserialisation guards: no pickle, no remote code, sha256 checked before anything loads."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from app.db.models import Adapter
from app.db.session import session_scope
from app.errors import UnsafeModelError
from app.ml.adapters import ADAPTER_WEIGHTS, check_adapter_dir
from app.ml.loading import load_base_model
from app.storage import file_sha256
from tests.factories import api_app, uploaded_file

pytestmark = pytest.mark.slow  # loads the tiny model


class Payload:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_adapter(base_dir: Path, out: Path) -> Path:
    import peft
    import torch

    torch.manual_seed(0)
    model = peft.get_peft_model(
        load_base_model(base_dir, device="cpu"),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]),
    )
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    return out


def register(settings, client, folder: Path, sha256: str) -> str:
    """An adapter row of the client's organization whose files are `folder`."""
    file_id = uploaded_file(client, 3)
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    job = job.json()
    adapter_id = f"ft:tiny:acme:x:{job['id']}"
    key = f"adapters/{job['id']}"
    shutil.copytree(folder, settings.artifacts_dir / key)
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(Adapter(
            id=adapter_id, organization_id=job["organization_id"], base_model="tiny",
            job_id=job["id"], storage_key=key, sha256=sha256, size_bytes=1,
            lora_config={"r": 4}, status="active",
        ))  # fmt: skip
    return adapter_id


def chat(client, model: str):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return client.post("/v1/chat/completions", json=body)


def test_pickled_adapter_is_refused_and_never_unpickled(client, settings, tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = make_adapter(tiny_model_dir, tmp_path / "good")
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeModelError):
        check_adapter_dir(folder)
    adapter_id = register(settings, client, folder, "0" * 64)
    answer = chat(client, adapter_id)
    print(f"\npickled-only adapter: chat {answer.status_code} {answer.text}")
    assert 400 <= answer.status_code < 600 and answer.status_code != 200, answer.text
    download = client.get(f"/v1/models/{adapter_id}/adapter")
    assert download.status_code == 500 and download.json()["error"]["code"] == "integrity_error"
    assert not marker.exists()


def test_flipped_byte_is_never_served_or_loaded(client, settings, tiny_model_dir, tmp_path):
    folder = make_adapter(tiny_model_dir, tmp_path / "good")
    adapter_id = register(settings, client, folder, file_sha256(folder / ADAPTER_WEIGHTS))
    good = client.get(f"/v1/models/{adapter_id}/adapter")
    assert good.status_code == 200 and good.headers["X-Adapter-SHA256"]
    stored = next((settings.artifacts_dir / "adapters").iterdir()) / ADAPTER_WEIGHTS
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    stored.write_bytes(bytes(blob))
    download = client.get(f"/v1/models/{adapter_id}/adapter")
    assert download.status_code == 500 and download.json()["error"]["code"] == "integrity_error"
    assert bytes(blob) not in download.content
    answer = chat(client, adapter_id)
    assert answer.status_code != 200 and "sha256" in answer.json()["error"]["message"]


def test_base_model_asking_for_remote_code_is_refused(tiny_model_dir, tmp_path, settings):
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil)
    marker = tmp_path / "remote-code-ran"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match="remote code"):
        load_base_model(evil, device="cpu")
    from fastapi.testclient import TestClient

    from tests.api.conftest import api_key

    settings.base_models = {"evil": str(evil)}
    app = api_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key(settings, 'acme')}"
        answer = chat(client, "evil")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "unsafe_model"
    assert not marker.exists()
