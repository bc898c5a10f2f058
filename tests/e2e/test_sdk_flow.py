"""The whole data path through the real stack, driven by the unmodified `openai` SDK.

Run once on the embedded default (`loraforge up`: SQLite + filesystem broker), once on
PostgreSQL + Redis (`loraforge api` + `loraforge worker` processes), and once more with
the artifacts in an S3 server (moto, on loopback) and the api and the worker on data dirs
of their own, as on two hosts that share nothing but PostgreSQL, Redis and the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import httpx
import openai
import pytest
import torch

from tests.e2e.stack import tail_logs, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QA = [(f"What is the code for item {i}?", f"K{i}-{'QXZW'[i % 4]}{i * 7 % 10}") for i in range(8)]


def dataset() -> bytes:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer with the code."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
        }
        for q, a in QA
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def local_greedy(model, tokenizer, input_ids: list[int], max_tokens: int) -> str:
    """Plain PEFT greedy decoding, no cache, no engine: the reference."""
    ids = list(input_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
            out.append(token)
    return tokenizer.decode(out)


def test_sdk_flow_end_to_end(stack, tmp_path, tiny_model_dir):
    client = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.key("acme"), max_retries=0
    )
    other = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.key("globex"), max_retries=0
    )

    # 1. upload
    training = client.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", dataset()), purpose="fine-tune")
    assert training.id.startswith("file-") and training.bytes == len(dataset())

    # 2. create, 3. watch
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=training.id,
        validation_file=validation.id,
        suffix="e2e",
        seed=11,
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 20},
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 3
    job = wait_for(client, job.id, stack)
    assert job.status == "succeeded", (job.error, tail_logs(stack.logs))
    assert job.fine_tuned_model == f"ft:tiny:acme:e2e:{job.id}" and job.trained_tokens > 0
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5).data] == [job.id]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 6 and all(e.data["train_loss"] > 0 for e in metrics)
    assert any(e.message.startswith("New fine-tuned model created") for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 4, 2]
    assert checkpoints[0].metrics.valid_loss is not None

    if "LORAFORGE_STORAGE_URL" in stack.env:  # in the store; on neither host's disk
        from app.config import Settings
        from app.storage import open_store

        store = open_store(
            Settings(data_dir=tmp_path, storage_url=stack.env["LORAFORGE_STORAGE_URL"])
        )
        assert store.exists(f"datasets/{training.id}.jsonl")
        assert store.manifest(f"adapters/{job.id}") is not None
        assert len(store.entries(f"checkpoints/{job.id}")) == 3
        for kind in ("datasets", "adapters", "checkpoints"):
            assert not list(tmp_path.glob(f"*-host/artifacts/{kind}")), kind

    # 4. registry
    listed = {m.id for m in client.models.list().data}
    assert {"tiny", job.fine_tuned_model} <= listed
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "acme"

    # 5. download and load with PEFT on the same base
    archive = httpx.get(
        f"{stack.base_url}/v1/models/{job.fine_tuned_model}/adapter",
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=60,
    )
    assert archive.status_code == 200
    adapter_dir = tmp_path / "downloaded"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as bundle:
        assert sorted(bundle.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        bundle.extractall(adapter_dir)
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert archive.headers["X-Adapter-SHA256"] == hashlib.sha256(archive.content).hexdigest()
    assert archive.headers["X-Adapter-Weights-SHA256"] == hashlib.sha256(weights).hexdigest()
    from peft import PeftModel

    from app.ml.chat import render_prompt
    from app.ml.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    local = PeftModel.from_pretrained(
        load_base_model(tiny_model_dir, device="cpu"), adapter_dir
    ).eval()

    # 6. call it: API greedy == local PEFT greedy
    question = QA[3][0]
    chat = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[
            {"role": "system", "content": "Answer with the code."},
            {"role": "user", "content": question},
        ],
        temperature=0,
        max_tokens=12,
    )
    prompt_ids = tokenizer(
        render_prompt(
            tokenizer,
            [
                {"role": "system", "content": "Answer with the code."},
                {"role": "user", "content": question},
            ],
        ),
        add_special_tokens=False,
    ).input_ids
    assert chat.choices[0].message.content == local_greedy(local, tokenizer, prompt_ids, 12)
    assert chat.usage.prompt_tokens == len(prompt_ids)
    completion = client.completions.create(
        model=job.fine_tuned_model, prompt="The code is", temperature=0, max_tokens=8
    )
    assert completion.choices[0].text == local_greedy(
        local, tokenizer, tokenizer("The code is").input_ids, 8
    )
    assert completion.usage.completion_tokens <= 8
    base_reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12
    )
    assert base_reply.choices[0].message.content != chat.choices[0].message.content

    # cancel: a queued or running job ends cancelled and publishes nothing
    doomed = client.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    assert client.fine_tuning.jobs.cancel(doomed.id).status in ("cancelled", "running")
    doomed = wait_for(client, doomed.id, stack)
    assert doomed.status == "cancelled" and doomed.fine_tuned_model is None

    # tenancy: every object of acme answers 404 to globex, exactly like an unknown id
    for call in (
        lambda: other.files.retrieve(training.id),
        lambda: other.files.content(training.id),
        lambda: other.files.delete(training.id),
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.models.retrieve(job.fine_tuned_model),
        lambda: other.models.retrieve(checkpoints[0].fine_tuned_model_checkpoint),
        lambda: other.models.delete(job.fine_tuned_model),
        lambda: other.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "x"}]
        ),
        lambda: other.completions.create(model=job.fine_tuned_model, prompt="x"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    foreign_download = httpx.get(
        f"{stack.base_url}/v1/models/{job.fine_tuned_model}/adapter",
        headers={"Authorization": f"Bearer {other.api_key}"},
    )
    assert foreign_download.status_code == 404
    assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
    assert {m.id for m in other.models.list().data} == {"tiny"}

    # checkpoints are models too
    ckpt = client.chat.completions.create(
        model=checkpoints[-1].fine_tuned_model_checkpoint,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=4,
    )
    assert ckpt.choices[0].finish_reason in ("stop", "length")

    # delete: neither the adapter nor any of its checkpoints can be called any more
    deleted = client.models.delete(job.fine_tuned_model)
    assert deleted.deleted is True
    kept = sorted(c.fine_tuned_model_checkpoint for c in checkpoints)
    assert deleted.model_extra["deleted_checkpoints"] == kept
    for model in (job.fine_tuned_model, *kept):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}]
            )
    assert job.fine_tuned_model not in {m.id for m in client.models.list().data}


def preference_dataset() -> bytes:
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [{"role": "assistant", "content": f"No code for {q[-2]}."}],
        }
        for q, a in QA
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize(
    "stack",
    ["embedded", pytest.param("postgres-redis", marks=pytest.mark.postgres)],
    indirect=True,
)
def test_sdk_dpo_after_sft(stack):
    """The usual recipe through the SDK: SFT, then DPO with `method={"type": "dpo", …}` on
    OpenAI-format preference data, starting from (and referencing) the SFT adapter."""
    client = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.key("acme"), max_retries=0
    )
    chat = client.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
    prefs = client.files.create(file=("prefs.jsonl", preference_dataset()), purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model="tiny", training_file=chat.id, suffix="sft", hyperparameters={"n_epochs": 2}
    )
    sft = wait_for(client, sft.id, stack)
    assert sft.status == "succeeded", (sft.error, tail_logs(stack.logs))

    with pytest.raises(openai.BadRequestError) as refused:  # chat data is no preference data
        client.fine_tuning.jobs.create(model="tiny", training_file=chat.id, method={"type": "dpo"})
    assert refused.value.body["param"] == "training_file"

    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=prefs.id, validation_file=prefs.id,
        method=method, suffix="dpo",
    )  # fmt: skip
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(client, job.id, stack)
    assert job.status == "succeeded", (job.error, tail_logs(stack.logs))
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics and all("train_reward_margin" in m for m in metrics)
    [last, *_] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert last.metrics.full_valid_loss is not None
    reply = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": QA[0][0]}],
        temperature=0,
        max_tokens=8,
    )
    assert reply.choices[0].message.role == "assistant"
