"""Hostile ids and text on SQLite and PostgreSQL: 400/404 in OpenAI's shape, never a 500.

The issue's probes first (a NUL in a path id, a body id and a file id; an event cursor
past a 32-bit integer or spelled with a non-ASCII digit; a lone surrogate in chat
content), then hypothesis over every id-taking operation of the tenant matrix with
hostile strings in each id.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.factories import uploaded_file
from tests.security.tenant_matrix import calls

HOSTILE = [
    "x\x00",
    "file-\x00",
    "ftevent-2147483648",
    "ftevent-99999999999999999999999",
    "ftevent-²",
    "ftevent--1",
    "\ud800",
    "a\udfff b",
    "\x7f",
    "x" * 300,
    "ft:tiny:acme:s:ftjob-\x00",
]


@pytest.fixture
def settings(backend):
    """On SQLite and on PostgreSQL."""
    return backend


def raw(client, method: str, url: str, *, params=None, body=None):
    """Send exactly these characters: path segments percent-encoded from their UTF-8 (lone
    surrogates included), the body as ASCII JSON with \\u escapes."""
    content = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    query = "&".join(
        f"{k}={quote(v, safe='', errors='surrogatepass')}" for k, v in (params or {}).items()
    )
    return client.request(
        method, url + ("?" + query if query else ""), content=content, headers=headers
    )


def path(template: str, values: dict[str, str]) -> str:
    return template.format(
        **{k: quote(v, safe="", errors="surrogatepass") for k, v in values.items()}
    )


def assert_refused(response, statuses=(400, 404)) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


@pytest.fixture
def job_id(client) -> str:
    file_id = uploaded_file(client, 5)
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]


def test_nul_in_a_path_id(client) -> None:
    for url in ("/v1/models/x%00", "/v1/files/file-%00", "/v1/fine_tuning/jobs/ftjob-%00"):
        assert_refused(client.get(url))


def test_nul_in_a_body_id(client) -> None:
    chat = {"model": "x\x00", "messages": [{"role": "user", "content": "hi"}]}
    response = raw(client, "POST", "/v1/chat/completions", body=chat)
    assert_refused(response)
    assert response.json()["error"]["param"] == "model"
    job = {"model": "tiny", "training_file": "file-\x00"}
    response = raw(client, "POST", "/v1/fine_tuning/jobs", body=job)
    assert_refused(response)
    assert response.json()["error"]["param"] == "training_file"


@pytest.mark.parametrize("after", ["ftevent-2147483648", "ftevent-²", "ftevent-\x00", "x"])
def test_bad_event_cursor(client, job_id, after) -> None:
    response = raw(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": after})
    assert_refused(response)
    assert response.json()["error"]["param"] == "after"


@pytest.mark.parametrize("text", ["\ud800", "a\udc00b", "nul\x00"])
def test_lone_surrogate_or_nul_in_text_is_refused_at_the_schema(client, text) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    response = raw(client, "POST", "/v1/chat/completions", body=chat)
    assert_refused(response, (400,))
    assert response.json()["error"]["param"] == "messages.0.content"
    response = raw(client, "POST", "/v1/completions", body={"model": "tiny", "prompt": text})
    assert_refused(response, (400,))
    assert response.json()["error"]["param"] == "prompt"


ids = st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=40)


def test_every_id_taking_operation_refuses_hostile_ids(client, tenant_a) -> None:
    operations = calls(tenant_a)

    @hypothesis_settings(
        max_examples=60, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(op=st.sampled_from(sorted(operations)), hostile=ids)
    def run(op, hostile) -> None:
        method, template = op
        for parts, _ in operations[op]:
            swap = dict.fromkeys(parts.get("path", {}), hostile)
            params = dict.fromkeys(parts.get("params", {}), hostile)
            body = {k: hostile if k in ("model", "training_file", "validation_file") else v
                    for k, v in parts.get("json", {}).items()}  # fmt: skip
            response = raw(client, method, path(template, swap), params=params, body=body or None)
            assert response.status_code < 500, (op, hostile, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    run()
