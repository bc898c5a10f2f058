"""Inference past the model's context or with max_tokens past it: 400 naming the field."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # loads the tiny model


@pytest.mark.parametrize(
    ("body", "params"),
    [
        # tiny model: 1024 positions; prompt + max_tokens past them (either field is at fault)
        ({"prompt": "hello " * 2000, "max_tokens": 1}, {"prompt", "max_tokens"}),
        ({"prompt": "hi", "max_tokens": 1_000_000}, {"max_tokens"}),
        ({"prompt": "hi", "max_tokens": 0}, {"max_tokens"}),
    ],
)
def test_completion_past_the_limits_is_400(client, body, params) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] in params


def test_chat_past_the_context_is_400(client) -> None:
    messages = [{"role": "user", "content": "word " * 3000}]
    response = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("messages", "prompt", "max_tokens")
