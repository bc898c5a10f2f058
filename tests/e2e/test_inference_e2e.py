"""Inference through real uvicorn with the unmodified `openai` SDK: streaming, logprobs,
concurrent clients on different adapters, and LORAFORGE_PRELOAD_ADAPTERS (pinned, warm
before the first request)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import make_settings
from tests.e2e.stack import cli, free_port, running, stack_env
from tests.factories import publish_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def served(tmp_path, tiny_model_dir):
    """The API (no worker) over a data dir holding three published adapters, one preloaded."""
    data = tmp_path / "data"
    env = stack_env(data, tiny_model_dir, LORAFORGE_MAX_LOADED_ADAPTERS="2")
    cli(env, "db", "upgrade")
    settings = make_settings(data, tiny_model_dir)
    adapters = [
        publish_adapter(settings, tiny_model_dir, org="acme", suffix=f"s{i}", seed=i, rank=r)
        for i, r in enumerate((4, 8, 4))
    ]
    env["LORAFORGE_PRELOAD_ADAPTERS"] = adapters[0]
    port = free_port()
    with running([["api", "--port", str(port)]], env, tmp_path / "logs", port) as stack:
        yield stack, adapters


def test_sdk_streaming_logprobs_concurrency_and_preload(served):
    stack, adapters = served
    key = stack.key("acme")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    view = httpx.get(
        f"{stack.base_url}/v1/engine/adapters", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert [(a["id"], a["loaded"], a["pinned"]) for a in view["data"]] == [
        (adapters[0], True, True)
    ]

    messages = [{"role": "user", "content": "Say something"}]
    whole = client.chat.completions.create(
        model=adapters[1], messages=messages, temperature=0, max_tokens=12
    )
    stream = client.chat.completions.create(
        model=adapters[1],
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = client.completions.create(
        model=adapters[2], prompt="Hello", temperature=0, max_tokens=6, logprobs=2
    )
    assert "".join(completion.choices[0].logprobs.tokens) == completion.choices[0].text
    streamed = client.completions.create(
        model=adapters[2], prompt="Hello", temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    # 8 concurrent clients over the base and three adapters (cache of 2 + the pinned one)
    models = ["tiny", *adapters] * 4

    def ask(model: str) -> str:
        return (
            client.completions.create(model=model, prompt="Once", temperature=0, max_tokens=8)
            .choices[0]
            .text
        )

    alone = {model: ask(model) for model in set(models)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, models))
    assert together == [alone[model] for model in models]
    assert len(set(alone.values())) == 4

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000, stream=True)
    assert info.value.body["param"] == "max_tokens"
    pinned = [
        a
        for a in httpx.get(
            f"{stack.base_url}/v1/engine/adapters", headers={"Authorization": f"Bearer {key}"}
        ).json()["data"]
        if a["pinned"]
    ]
    assert [a["id"] for a in pinned] == [adapters[0]] and pinned[0]["evictions"] == 0
