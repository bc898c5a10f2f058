"""QLoRA through the API: a job asking `quantization=nf4` trains on the 4-bit base, its
adapter records the quantization and answers what it memorised, served on a base that
`LORAFORGE_BASE_MODELS` quantizes too; a job that cannot run quantized is refused (400) or
fails naming `hyperparameters.quantization`, without server paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import migrate
from app.db.models import Job
from tests.conftest import make_settings
from tests.factories import chat_rows, create_job, jsonl, load, upload, without_bitsandbytes

pytest.importorskip("bitsandbytes")

from app.ml.tiny_model import build_tiny_model
from worker.run_job import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM = "hyperparameters.quantization"
N_ITEMS = 12
# 12 question → code pairs memorised in 50 epochs (about 10 s here); a full-precision run of
# the same reproduces all 12, so the bar is 10 of 12.
MEMORISE = {
    "n_epochs": 50,
    "batch_size": 2,
    "learning_rate": 3e-3,
    "lora_r": 16,
    "n_checkpoints": 1,  # not one per epoch: this test is about learning
}
AT_LEAST = 10


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path):
    """`tiny` served 4-bit; `odd` has an MLP of 344, which the CPU 4-bit kernel cannot run."""
    odd = build_tiny_model(tmp_path / "odd", intermediate_size=344)
    bases = {"tiny": f"{tiny_model_dir};quantization=nf4", "odd": str(odd)}
    settings = make_settings(
        tmp_path / "data", tiny_model_dir, base_models=bases, metrics_every_steps=100
    )
    migrate.upgrade(settings)
    return settings


def training_file(client, n: int = N_ITEMS) -> str:
    response = upload(client, jsonl(chat_rows(n)))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def answer(client, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}]}
    response = client.post("/v1/chat/completions", json=body | {"max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_without_bitsandbytes_a_quantized_job_is_400(client, settings, monkeypatch) -> None:
    file_id = training_file(client, 3)
    without_bitsandbytes(monkeypatch)
    response = create_job(
        client, model="tiny", training_file=file_id, hyperparameters={"quantization": "nf4"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == PARAM and "bitsandbytes" in error["message"]
    assert load(settings, Job) == []
    plain = create_job(client, model="tiny", training_file=file_id)  # needs no bitsandbytes
    assert plain.status_code == 200, plain.text


@pytest.mark.slow
def test_a_worker_without_bitsandbytes_fails_the_job_naming_the_param(
    client, settings, monkeypatch
) -> None:
    body = {"model": "tiny", "training_file": training_file(client, 3)}
    job = create_job(client, **body, hyperparameters={"quantization": "int8"}).json()
    without_bitsandbytes(monkeypatch)  # the API had it; this worker does not
    assert run_job(job["id"], settings=settings) == "failed"
    error = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["error"]
    assert error["param"] == PARAM and error["code"] == "quantization_unavailable"
    assert "bitsandbytes" in error["message"]


@pytest.mark.slow
def test_a_base_that_cannot_be_quantized_fails_the_job_saying_why(client, settings) -> None:
    body = {"model": "odd", "training_file": training_file(client, 3)}
    job = create_job(client, **body, hyperparameters={"quantization": "nf4"}).json()
    assert run_job(job["id"], settings=settings) == "failed"
    error = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["error"]
    assert error["param"] == PARAM and "344 outputs" in error["message"], error
    assert str(settings.data_dir.parent) not in error["message"]


@pytest.mark.slow
def test_a_qlora_job_learns_and_its_adapter_records_the_quantization(client, settings) -> None:
    hp = MEMORISE | {"quantization": "nf4"}
    response = create_job(
        client, model="tiny", training_file=training_file(client), hyperparameters=hp
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert run_job(job_id, settings=settings) == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["hyperparameters"]["quantization"] == "nf4"
    model = client.get(f"/v1/models/{job['fine_tuned_model']}").json()
    assert model["lora_config"]["quantization"] == "nf4", model

    rows = chat_rows(N_ITEMS)
    questions = [row["messages"][0]["content"] for row in rows]
    codes = [row["messages"][1]["content"] for row in rows]
    adapter = [answer(client, job["fine_tuned_model"], q) for q in questions]
    base = [answer(client, "tiny", q) for q in questions]
    hits = sum(a == c for a, c in zip(adapter, codes, strict=True))
    print(f"\nQLoRA adapter on the nf4-served base: {hits}/{N_ITEMS} memorised answers")
    assert hits >= AT_LEAST, list(zip(adapter, codes, strict=True))
    assert not any(b == c for b, c in zip(base, codes, strict=True))


@pytest.mark.slow
def test_an_int8_job_trains_on_cpu(client, settings) -> None:
    """bitsandbytes 0.50 runs LLM.int8() on CPU, so int8 is not refused there."""
    body = {"model": "tiny", "training_file": training_file(client, 3)}
    hp = {"quantization": "int8", "n_epochs": 1, "batch_size": 3, "n_checkpoints": 1}
    job = create_job(client, **body, hyperparameters=hp).json()
    assert run_job(job["id"], settings=settings) == "succeeded"
    model = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"]
    assert client.get(f"/v1/models/{model}").json()["lora_config"]["quantization"] == "int8"
