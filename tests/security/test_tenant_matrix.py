"""Tenant isolation matrix generated from the OpenAPI schema.

Organization B calls every id-taking operation with organization A's ids. Path ids
answer 404, ids in a JSON body 400 naming the field (as OpenAI does for a bad
`training_file`), admin routes 403; every answer is byte-identical to the one for an
unknown id (with the id B sent masked) and names nothing else of A's. The test fails
when the schema gains an id-taking operation the matrix does not cover.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from app.db.models import Adapter, Checkpoint
from app.db.session import session_scope
from app.ids import new_id
from app.registry import service as registry
from tests.api.test_files import jsonl, upload
from tests.conftest import chat_rows

BODY_ID_FIELDS = {"training_file", "validation_file", "model"}


@dataclass
class TenantA:
    org_id: str
    file: str
    job: str
    adapter: str
    checkpoint: str
    checkpoint_row: str

    def secrets(self) -> list[str]:
        return [
            self.org_id, self.file, self.job, self.adapter, self.checkpoint,
            self.checkpoint_row, "acme", "secret-name.jsonl", "secret-sfx",
        ]  # fmt: skip


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


def calls(a: TenantA) -> dict[tuple[str, str], list[tuple[dict, int]]]:
    """(method, path) → [(request parts with A's ids, expected status)]."""
    msg = [{"role": "user", "content": "hi"}]
    models = [a.adapter, a.checkpoint]
    job = {"job_id": a.job}
    return {
        ("GET", "/v1/files/{file_id}"): [({"path": {"file_id": a.file}}, 404)],
        ("DELETE", "/v1/files/{file_id}"): [({"path": {"file_id": a.file}}, 404)],
        ("GET", "/v1/files/{file_id}/content"): [({"path": {"file_id": a.file}}, 404)],
        ("POST", "/v1/fine_tuning/jobs"): [
            ({"json": {"model": "tiny", "training_file": a.file}}, 400),
            ({"json": {"model": "tiny", "training_file": "OWN", "validation_file": a.file}}, 400),
            ({"json": {"model": a.adapter, "training_file": "OWN"}}, 400),
        ],
        ("GET", "/v1/fine_tuning/jobs"): [({"params": {"after": a.job}}, 404)],
        ("GET", "/v1/fine_tuning/jobs/{job_id}"): [({"path": job}, 404)],
        ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): [({"path": job}, 404)],
        ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): [({"path": job}, 404)],
        ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): [
            ({"path": job}, 404),
            ({"path": {"job_id": "OWNJOB"}, "params": {"after": a.checkpoint_row}}, 404),
        ],
        ("GET", "/v1/models/{model_id}/adapter"): [
            ({"path": {"model_id": m}}, 404) for m in models
        ],
        ("GET", "/v1/models/{model_id}"): [({"path": {"model_id": m}}, 404) for m in models],
        ("DELETE", "/v1/models/{model_id}"): [({"path": {"model_id": m}}, 404) for m in models],
        ("POST", "/v1/completions"): [
            ({"json": {"model": m, "prompt": "hi"}}, 404) for m in models
        ],
        ("POST", "/v1/chat/completions"): [
            ({"json": {"model": m, "messages": msg}}, 404) for m in models
        ],
        ("POST", "/v1/admin/organizations/{organization}/keys"): [
            ({"path": {"organization": "acme"}}, 403)
        ],
        ("GET", "/v1/admin/keys"): [({"params": {"organization": "acme"}}, 403)],
        ("POST", "/v1/admin/keys/{key_id}/revoke"): [({"path": {"key_id": "key-x"}}, 403)],
    }


@pytest.fixture
def tenant_a(client, settings) -> TenantA:  # type: ignore[no-untyped-def]
    file_id = upload(client, jsonl(chat_rows(5)), name="secret-name.jsonl").json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": file_id, "suffix": "secret-sfx"},
    ).json()
    adapter = registry.adapter_name(
        base_model="tiny", organization="acme", suffix="secret-sfx", job_id=job["id"]
    )
    checkpoint, checkpoint_row = registry.checkpoint_name(adapter, 4), new_id("ftckpt")
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(Adapter(
            id=adapter, organization_id=job["organization_id"], base_model="tiny",
            job_id=job["id"], storage_key=f"adapters/{job['id']}", sha256="0" * 64,
            size_bytes=1, lora_config={"r": 8}, status="active",
        ))  # fmt: skip
        session.add(Checkpoint(
            id=checkpoint_row, job_id=job["id"], organization_id=job["organization_id"],
            step_number=4, fine_tuned_model_checkpoint=checkpoint, metrics={},
            storage_key=f"checkpoints/{job['id']}/4", sha256="0" * 64,
        ))  # fmt: skip
    return TenantA(job["organization_id"], file_id, job["id"], adapter, checkpoint, checkpoint_row)


def unknown(value: str) -> str:
    """An id of the same shape that nobody owns."""
    return re.sub(r"[A-Za-z0-9]{24}", "Z" * 24, value)


def send(client, method: str, path: str, parts: dict, swap) -> object:  # type: ignore[no-untyped-def]
    url = path.format(**{k: swap(v) for k, v in parts.get("path", {}).items()})
    params = {k: swap(v) for k, v in parts.get("params", {}).items()}
    body = {k: swap(v) if isinstance(v, str) else v for k, v in parts.get("json", {}).items()}
    return client.request(method, url, params=params, json=body or None)


def test_every_id_taking_operation_is_in_the_matrix(app, tenant_a) -> None:  # type: ignore[no-untyped-def]
    assert id_operations(app.openapi()) == set(calls(tenant_a))


def test_organization_b_gets_404_and_learns_nothing_of_a(client, other_client, tenant_a):  # type: ignore[no-untyped-def]
    own_file = upload(other_client, jsonl(chat_rows(3))).json()["id"]
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


def test_list_endpoints_never_show_foreign_rows(other_client, tenant_a) -> None:  # type: ignore[no-untyped-def]
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        response = other_client.get(path)
        assert response.status_code == 200
        assert not any(secret in response.text for secret in tenant_a.secrets()), path
    models = other_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"]


@pytest.mark.parametrize(
    "field", ["organization_id", "status", "attempt", "storage_key", "sha256", "base_model_path"]
)
def test_injected_fields_are_refused_and_nothing_is_stored(other_client, field) -> None:  # type: ignore[no-untyped-def]
    own_file = upload(other_client, jsonl(chat_rows(3))).json()["id"]
    body = {"model": "tiny", "training_file": own_file, field: "x"}
    response = other_client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert other_client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_unknown_query_parameters_are_refused_and_named(other_client) -> None:  # type: ignore[no-untyped-def]
    response = other_client.get("/v1/fine_tuning/jobs", params={"limit": 2, "organization_id": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "organization_id"
    assert other_client.get("/v1/fine_tuning/jobs", params={"limit": 2}).status_code == 200
