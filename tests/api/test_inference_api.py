"""/v1/completions, /v1/chat/completions (JSON and SSE) and /v1/engine/adapters, in process.

Adapters are published the way a finished job publishes them: PEFT files in the artifact
store and one registry row, owned by the caller's organization.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app import tenancy  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.errors import ServiceUnavailable  # noqa: E402
from app.inference import engine as engine_module  # noqa: E402
from app.inference import kv_budget  # noqa: E402
from app.inference.scheduler import BaseScheduler  # noqa: E402
from app.registry import service as registry  # noqa: E402
from app.storage import LocalStore  # noqa: E402
from tests.factories import PROMPT, complete, publish_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def adapter(settings, tiny_model_dir) -> str:
    return publish_adapter(settings, tiny_model_dir, org="acme", suffix="one", seed=1)


def sse(response) -> list[dict | str]:
    """The events of an SSE body: parsed JSON, or the literal '[DONE]'."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_completion_json_and_stream_agree(client, adapter):
    whole = complete(client, model=adapter, max_tokens=12)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["object"] == "text_completion" and body["model"] == adapter
    assert body["usage"]["prompt_tokens"] == len(PROMPT)
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    events = sse(
        complete(
            client,
            model=adapter,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == body["choices"][0][
        "finish_reason"
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == body["usage"]


def test_chat_stream_starts_with_the_role_and_matches_json(client, adapter):
    body = {
        "model": adapter,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "max_tokens": 10,
    }
    whole = client.post("/v1/chat/completions", json=body).json()
    events = sse(client.post("/v1/chat/completions", json=body | {"stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_completion_logprobs(client, adapter):
    body = complete(client, model=adapter, max_tokens=8, logprobs=3).json()
    choice = choice_of(body)
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert (
        len(logprobs["tokens"])
        == len(logprobs["token_logprobs"])
        == len(logprobs["top_logprobs"])
        == len(logprobs["text_offset"])
    )
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    for token, lp, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(lp)  # greedy: the chosen one is the top
        assert top.get(token) == pytest.approx(lp)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert choice_of(complete(client, model=adapter, max_tokens=8).json())["logprobs"] is None


def choice_of(body: dict) -> dict:
    return body["choices"][0]


def test_stop_and_seed(client):
    full = choice_of(complete(client, model="tiny", max_tokens=20).json())["text"]
    stop = full[5:7]
    cut = choice_of(complete(client, model="tiny", max_tokens=20, stop=[stop, "zzzz"]).json())
    assert (cut["text"], cut["finish_reason"]) == (full[: full.find(stop)], "stop")
    streamed = sse(complete(client, model="tiny", max_tokens=20, stop=stop, stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == cut["text"]

    def sampled(seed: int) -> str:
        body = {"temperature": 1.0, "seed": seed, "max_tokens": 16}
        return choice_of(complete(client, model="tiny", **body).json())["text"]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 2000}, "max_tokens"),  # past the 1024-token context
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "max_tokens": 2000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_bad_completion_requests_name_the_field(client, adapter, body, param):
    response = complete(client, model=adapter, **body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == param
    assert client.get("/v1/engine/adapters").json()["data"] == []  # nothing ran or loaded


def test_bad_chat_requests_name_the_field(client, adapter):
    base = {"model": adapter, "messages": [{"role": "user", "content": "hi"}]}
    for extra, param in [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 20}, "top_logprobs"),  # one bound, in the schema
        ({"max_completion_tokens": 5000}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"stream": True, "max_tokens": 5000}, "max_tokens"),
    ]:
        response = client.post("/v1/chat/completions", json=base | extra)
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param, extra
    assert client.get("/v1/engine/adapters").json()["data"] == []


def test_unknown_or_foreign_model_is_404_even_when_streaming(client, other_client, adapter):
    for caller, model in [(client, "ft:tiny:acme::ftjob-nope"), (other_client, adapter)]:
        for stream in (False, True):
            response = complete(caller, model=model, stream=stream)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["param"] == "model"


def test_visibility_counts_per_adapter_and_shows_only_the_callers(
    client, other_client, adapter, settings, tiny_model_dir
):
    theirs = publish_adapter(settings, tiny_model_dir, org="globex", suffix="two", seed=2)
    first = complete(client, model=adapter, max_tokens=4).json()
    second = complete(client, model=adapter, max_tokens=6).json()
    assert complete(other_client, model=theirs, max_tokens=3).status_code == 200
    view = client.get("/v1/engine/adapters").json()
    (mine,) = view["data"]
    assert mine["id"] == adapter and mine["loaded"] and not mine["pinned"]
    assert (mine["misses"], mine["hits"], mine["requests"], mine["loads"]) == (1, 1, 2, 1)
    assert mine["prompt_tokens"] == 2 * len(PROMPT)
    assert mine["completion_tokens"] == sum(
        b["usage"]["completion_tokens"] for b in (first, second)
    )
    assert mine["rank"] == 4 and mine["bytes"] > 0 and mine["last_used"] is not None
    assert view["base_models"][0]["loaded"] == [adapter]
    assert [a["id"] for a in other_client.get("/v1/engine/adapters").json()["data"]] == [theirs]


def test_delete_unloads_then_refuses(client, adapter):
    assert complete(client, model=adapter, max_tokens=2).status_code == 200
    assert client.delete(f"/v1/models/{adapter}").status_code == 200
    (entry,) = client.get("/v1/engine/adapters").json()["data"]
    assert entry["loaded"] is False and entry["evictions"] == 1
    assert client.get("/v1/engine/adapters").json()["base_models"][0]["loaded"] == []
    for stream in (False, True):
        assert complete(client, model=adapter, stream=stream).status_code == 404


def test_tampered_adapter_is_the_servers_fault_before_any_stream(client, adapter, settings):
    with session_scope(settings.sqlalchemy_url) as session:
        row = registry.find_adapters(session, model_ids=[adapter])[0]
        weights = LocalStore(settings.artifacts_dir).path(row.storage_key)
    blob = weights / "adapter_model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    for stream in (False, True):
        response = complete(client, model=adapter, stream=stream)
        assert response.status_code == 500, response.text  # as its download answers
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("integrity_error", "server_error")
        assert "sha256" in error["message"] and adapter in error["message"]
    assert [a["loaded"] for a in client.get("/v1/engine/adapters").json()["data"]] == [False]


GENERIC = {
    "message": "The server had an error processing your request.",
    "type": "server_error",
    "param": None,
    "code": None,
}
UNLOADED = ServiceUnavailable("the adapter was unloaded for another; retry")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (RuntimeError("CUDA failed in /srv/loraforge/kernels.cu"), GENERIC),
        (UNLOADED, {**GENERIC, "message": UNLOADED.message, "code": "service_unavailable"}),
    ],
)
def test_a_stream_that_fails_midway_is_logged_and_shows_no_internals(
    client, monkeypatch, caplog, failure, expected
):
    """After the 200 is sent, an error ends the stream as an event in OpenAI's envelope: an
    unexpected one as the generic message (the log has it with its traceback), a domain one
    with its own message."""
    real = BaseScheduler._step

    def step(self):
        # the stream has started: prefill and two steps streamed
        if self.counts.everyone()["steps"] >= 2:
            raise failure
        real(self)

    monkeypatch.setattr(BaseScheduler, "_step", step)
    monkeypatch.setattr(engine_module, "eos_token_ids", lambda *_: frozenset())  # no early end
    events = sse(complete(client, model="tiny", max_tokens=20, stream=True))
    assert "[DONE]" not in events and len(events) >= 2
    assert events[-1] == {"error": expected}
    logged = [r for r in caplog.records if r.name == "app.api.routes.inference"]
    assert logged and str(failure) in logged[-1].getMessage() + str(logged[-1].exc_info)
    if expected is GENERIC:
        assert logged[-1].exc_info is not None  # the traceback


def test_a_refused_adapter_is_named_without_the_server_path(client, settings, adapter):
    """The refusal wraps a message that names the adapter's folder; users see no path."""
    job_id = adapter.rsplit(":", 1)[-1]
    (settings.artifacts_dir / "adapters" / job_id / "adapter_model.safetensors").unlink()
    for stream in (False, True):
        response = complete(client, model=adapter, max_tokens=2, stream=stream)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert adapter in message and str(settings.data_dir) not in message, message
        assert "/artifacts/" not in message, message


def test_the_kv_cache_view_shows_the_budget_and_only_the_callers_use(
    client, other_client, settings, monkeypatch
):
    """Issue 15: the budget and what waits for it are visible; issue 14: only one's own."""
    monkeypatch.setattr(engine_module, "eos_token_ids", lambda *_: frozenset())  # no early end
    monkeypatch.setattr(kv_budget, "free_bytes", lambda _device: 1_000_000)
    assert complete(client, model="tiny", max_tokens=1).status_code == 200  # the engine runs
    too_big = complete(client, model="tiny", max_tokens=600)  # more than the whole budget
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
    assert "max_tokens 600" in too_big.json()["error"]["message"]
    with session_scope(settings.sqlalchemy_url) as session:
        acme = tenancy.get_or_create_organization(session, name="acme").id
    engine = client.app.state.engine
    held = [
        engine.submit(base_model="tiny", adapter=None, prompt=PROMPT, max_tokens=400, owner=acme)
        for _ in range(2)  # each fits alone, not both: the second waits for cache
    ]
    try:
        next(held[0].deltas())
        for _ in range(200):  # bounded: until the first runs and the second is held back
            mine = client.get("/v1/engine/adapters").json()["base_models"][0]["kv_cache"]
            if mine["waiting_for_cache"] == 1 and mine["cached_tokens"] > 0:
                break
        theirs = other_client.get("/v1/engine/adapters").json()["base_models"][0]
    finally:
        for request in held:
            request.cancel()
    assert mine["waiting_for_cache"] == 1, mine
    assert (
        mine["budget_tokens"]
        == int(1_000_000 * settings.kv_cache_fraction) // mine["bytes_per_token"]
    )
    assert mine["cached_tokens"] > 0 and mine["reserved_tokens"] == len(PROMPT) + 400, mine
    budget = ("budget_tokens", "budget_bytes", "bytes_per_token", "fraction")
    assert theirs["kv_cache"] == {
        **{key: mine[key] for key in budget},  # the budget, but nothing of acme's load
        "cached_tokens": 0,
        "reserved_tokens": 0,
        "waiting_for_cache": 0,
    }
    assert (theirs["running"], theirs["waiting"]) == (0, 0)
