"""The tenant matrix's organization A and every id-taking call made with A's ids.

tests/security/test_tenant_matrix.py sends them as organization B (404, learns nothing);
tests/security/test_hostile_input.py sends them with hostile ids instead (never a 500).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.db.models import Adapter, Checkpoint, WebhookEndpoint
from app.db.session import session_scope
from app.ids import new_id
from app.registry import service as registry
from tests.factories import uploaded_file

WEBHOOK_URL, WEBHOOK_SECRET = "https://secret-hook.example.com/x", "whsec_c2VjcmV0LWhvb2s="


@dataclass
class TenantA:
    org_id: str
    file: str
    job: str
    adapter: str
    checkpoint: str
    checkpoint_row: str
    webhook: str

    def secrets(self) -> list[str]:
        return [
            self.org_id, self.file, self.job, self.adapter, self.checkpoint,
            self.checkpoint_row, "acme", "secret-name.jsonl", "secret-sfx", self.webhook,
            WEBHOOK_URL, WEBHOOK_SECRET,
        ]  # fmt: skip


def create_tenant_a(client, settings) -> TenantA:
    """A file, a job, an adapter and a checkpoint of `client`'s organization (acme)."""
    file_id = uploaded_file(client, 5, name="secret-name.jsonl")
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": file_id, "suffix": "secret-sfx"},
    ).json()
    adapter = registry.adapter_name(
        base_model="tiny", organization="acme", suffix="secret-sfx", job_id=job["id"]
    )
    checkpoint, checkpoint_row = registry.checkpoint_name(adapter, 4), new_id("ftckpt")
    webhook = new_id("wh")
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
        session.add(WebhookEndpoint(
            id=webhook, organization_id=job["organization_id"], url=WEBHOOK_URL,
            event_types=["fine_tuning.job.succeeded"], secret=WEBHOOK_SECRET,
        ))  # fmt: skip
    return TenantA(
        job["organization_id"], file_id, job["id"], adapter, checkpoint, checkpoint_row, webhook
    )


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
            ({"json": {"model": a.checkpoint, "training_file": "OWN"}}, 400),
        ],
        ("GET", "/v1/fine_tuning/jobs"): [({"params": {"after": a.job}}, 404)],
        ("GET", "/v1/fine_tuning/jobs/{job_id}"): [({"path": job}, 404)],
        ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): [({"path": job}, 404)],
        ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"): [({"path": job}, 404)],
        ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"): [({"path": job}, 404)],
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
        ("DELETE", "/v1/webhooks/{webhook_id}"): [({"path": {"webhook_id": a.webhook}}, 404)],
        ("GET", "/v1/webhooks/{webhook_id}/deliveries"): [
            ({"path": {"webhook_id": a.webhook}}, 404)
        ],
    }
