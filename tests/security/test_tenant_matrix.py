"""Tenant isolation matrix generated from the OpenAPI schema.

Organization B calls every id-taking operation with organization A's ids. Path ids
answer 404, ids in a JSON body 400 naming the field (as OpenAI does for a bad
`training_file`), admin routes 403; every answer is byte-identical to the one for an
unknown id (with the id B sent masked) and names nothing else of A's. The test fails
when the schema gains an id-taking operation the matrix does not cover.
"""

from __future__ import annotations

import re

import pytest

from tests.factories import uploaded_file
from tests.security.tenant_matrix import calls

BODY_ID_FIELDS = {"training_file", "validation_file", "model"}


def id_operations(schema: dict) -> set[tuple[str, str]]:
    """Every operation with a path parameter, an `after` cursor, or an id field in its body."""
    components = schema["components"]["schemas"]
    found = set()
    for path, item in schema["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            takes_id = any(
                p["in"] == "path" or p["name"] in ("after", "organization") for p in params
            )
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "")
            props = components[ref.rsplit("/", 1)[-1]]["properties"] if ref else {}
            if takes_id or BODY_ID_FIELDS & set(props):
                found.add((method.upper(), path))
    return found


def unknown(value: str) -> str:
    """An id of the same shape that nobody owns."""
    return re.sub(r"[A-Za-z0-9]{24}", "Z" * 24, value)


def send(client, method: str, path: str, parts: dict, swap) -> object:
    url = path.format(**{k: swap(v) for k, v in parts.get("path", {}).items()})
    params = {k: swap(v) for k, v in parts.get("params", {}).items()}
    body = {k: swap(v) if isinstance(v, str) else v for k, v in parts.get("json", {}).items()}
    return client.request(method, url, params=params, json=body or None)


def test_every_id_taking_operation_is_in_the_matrix(app, tenant_a) -> None:
    assert id_operations(app.openapi()) == set(calls(tenant_a))


def test_organization_b_gets_404_and_learns_nothing_of_a(client, other_client, tenant_a):
    own_file = uploaded_file(other_client, 3)
    own_job = other_client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": own_file}
    ).json()["id"]
    own = {"OWN": own_file, "OWNJOB": own_job}
    checked = 0
    for (method, path), cases in calls(tenant_a).items():
        for parts, status in cases:
            sent = {v for group in parts.values() for v in group.values() if isinstance(v, str)}
            foreign = send(other_client, method, path, parts, lambda v: own.get(v, v))
            stranger = send(other_client, method, path, parts, lambda v: own.get(v, unknown(v)))
            assert foreign.status_code == status, (method, path, foreign.text)
            masked, masked_unknown = foreign.text, stranger.text
            for value in sent - set(own):
                masked = masked.replace(value, "<ID>")
                masked_unknown = masked_unknown.replace(unknown(value), "<ID>")
            assert masked == masked_unknown, (method, path)
            assert not any(secret in masked for secret in tenant_a.secrets()), (method, path)
            checked += 1
    assert checked >= 20
    # A's objects are untouched by B's deletes and cancels.
    assert client.get(f"/v1/files/{tenant_a.file}").status_code == 200
    assert client.get(f"/v1/fine_tuning/jobs/{tenant_a.job}").json()["status"] == "queued"
    assert client.get(f"/v1/models/{tenant_a.adapter}").status_code == 200


def test_list_endpoints_never_show_foreign_rows(other_client, tenant_a) -> None:
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/webhooks"):
        response = other_client.get(path)
        assert response.status_code == 200
        assert not any(secret in response.text for secret in tenant_a.secrets()), path
    models = other_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"]


@pytest.mark.parametrize(
    "field", ["organization_id", "status", "attempt", "storage_key", "sha256", "base_model_path"]
)
def test_injected_fields_are_refused_and_nothing_is_stored(other_client, field) -> None:
    own_file = uploaded_file(other_client, 3)
    body = {"model": "tiny", "training_file": own_file, field: "x"}
    response = other_client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert other_client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_unknown_query_parameters_are_refused_and_named(other_client) -> None:
    response = other_client.get("/v1/fine_tuning/jobs", params={"limit": 2, "organization_id": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "organization_id"
    assert other_client.get("/v1/fine_tuning/jobs", params={"limit": 2}).status_code == 200
