"""Issue 11 §5: webhook endpoints (per organization, secret shown once, SSRF refused), the
outbox written in the transaction that ends a job, and signed delivery with retries to a
receiver on loopback, verified with standardwebhooks and the openai SDK. Retries are driven
by calling the delivery function under a fake clock, never by waiting."""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import httpx
import openai
import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from app.db.base import utcnow
from app.db.models import Job, Organization, WebhookDelivery
from app.db.session import session_scope
from app.jobs import publishing
from app.jobs import runs as job_runs
from app.jobs import service as jobs
from app.statuses import DeliveryStatus, JobStatus
from app.webhooks import delivery, queue, urls
from tests.factories import submit
from tests.webhook_receiver import Receiver, free_port, receiving, self_signed

pytestmark = pytest.mark.usefixtures("woken")  # no broker: messages are recorded

ALL_EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


@pytest.fixture
def settings(backend):
    """SQLite and PostgreSQL: the outbox's conditional UPDATEs and JSON on both."""
    return backend


@pytest.fixture
def woken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The delivery messages sent after commits (no broker in these tests)."""
    sent: list[str] = []
    monkeypatch.setattr(queue, "enqueue_delivery", lambda delivery_id: sent.append(delivery_id))
    return sent


@pytest.fixture
def private_ok(settings):
    settings.webhook_allow_private = True  # the receivers live on loopback
    return settings


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow() + timedelta(minutes=1)  # rows the test writes are due at once

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(delivery, "clock", fake)
    return fake


def create_webhook(client, url: str, events=None):
    return client.post("/v1/webhooks", json={"url": url, "event_types": events or ALL_EVENTS})


def cancel_queued_job(settings, org: str = "acme") -> str:
    """A job of `org` that ends `cancelled` (the API's cancel of a queued job)."""
    job_id = submit(settings, org=org)
    with session_scope(settings.sqlalchemy_url) as session:
        organization = session.scalars(select(Organization).where(Organization.name == org)).one()
        jobs.cancel_job(session, organization=organization, job_id=job_id)
    return job_id


def deliveries(settings, job_id: str | None = None) -> list[WebhookDelivery]:
    with session_scope(settings.sqlalchemy_url) as session:
        rows = list(session.scalars(select(WebhookDelivery)))
        session.expunge_all()
    return [
        row for row in rows if job_id is None or json.loads(row.payload)["data"]["id"] == job_id
    ]


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.usefixtures("private_ok")
def test_create_list_delete_per_organization(client, other_client) -> None:
    created = create_webhook(client, "http://127.0.0.1:9/hook", ["fine_tuning.job.failed"])
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
    assert body["event_types"] == ["fine_tuning.job.failed"]
    assert body["url"] == "http://127.0.0.1:9/hook"
    listed = client.get("/v1/webhooks").json()["data"]
    assert [row["id"] for row in listed] == [body["id"]]
    assert "secret" not in listed[0]  # shown once, at creation only
    assert body["secret"] not in client.get("/v1/webhooks").text
    # another organization sees nothing and cannot touch it: 404, as for an unknown id
    assert other_client.get("/v1/webhooks").json()["data"] == []
    assert other_client.delete(f"/v1/webhooks/{body['id']}").status_code == 404
    assert other_client.get(f"/v1/webhooks/{body['id']}/deliveries").status_code == 404
    assert client.get(f"/v1/webhooks/{body['id']}/deliveries").json()["data"] == []
    assert client.delete(f"/v1/webhooks/{body['id']}").json()["deleted"] is True
    assert client.get("/v1/webhooks").json()["data"] == []
    assert client.delete(f"/v1/webhooks/{body['id']}").status_code == 404


@pytest.mark.usefixtures("private_ok")
def test_unknown_event_type_is_refused_naming_the_field(client) -> None:
    response = create_webhook(client, "http://127.0.0.1:9/", ["fine_tuning.job.exploded"])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "event_types"
    assert client.get("/v1/webhooks").json()["data"] == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.7:8080/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8000/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost:8000/hook",  # a name that resolves to loopback
    ],
)
def test_private_addresses_are_refused_without_the_flag(client, settings, url) -> None:
    assert settings.webhook_allow_private is False
    response = create_webhook(client, url)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "url" and "LORAFORGE_WEBHOOK_ALLOW_PRIVATE" in error["message"]
    assert client.get("/v1/webhooks").json()["data"] == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost"])
@pytest.mark.usefixtures("private_ok")
def test_only_http_and_https_urls(client, url) -> None:
    response = create_webhook(client, url)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "url"


# --- the outbox ----------------------------------------------------------------------------


def test_the_outbox_row_commits_and_rolls_back_with_the_status_change(
    client, private_ok, woken
) -> None:
    settings = private_ok
    assert create_webhook(client, "http://127.0.0.1:9/hook").status_code == 200
    job_id = submit(settings, org="acme")
    with pytest.raises(RuntimeError, match="boom"):
        with session_scope(settings.sqlalchemy_url) as session:
            org = session.scalars(select(Organization).where(Organization.name == "acme")).one()
            jobs.cancel_job(session, organization=org, job_id=job_id)
            assert len(deliveries_in(session)) == 1  # written in this transaction...
            raise RuntimeError("boom")
    assert deliveries(settings) == []  # ...and gone with it
    assert woken == []  # no message for a row that was never committed
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.QUEUED
    cancel_queued_job_again(settings, job_id)
    [row] = deliveries(settings, job_id)
    assert woken == [row.id]  # woken once, after the commit
    payload = json.loads(row.payload)
    assert payload["object"] == "event" and payload["type"] == "fine_tuning.job.cancelled"
    assert payload["data"] == {"id": job_id} and isinstance(payload["created_at"], int)


def deliveries_in(session) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery)))


def cancel_queued_job_again(settings, job_id: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        org = session.scalars(select(Organization).where(Organization.name == "acme")).one()
        jobs.cancel_job(session, organization=org, job_id=job_id)


def test_every_terminal_transition_writes_its_event(client, private_ok, woken, monkeypatch) -> None:
    """succeeded (complete_job), failed (end_run), the sweep's failed and cancelled; only
    the subscribed types, and nothing for other organizations' jobs."""
    settings = private_ok
    create_webhook(client, "http://127.0.0.1:9/a", ["fine_tuning.job.succeeded"])
    create_webhook(client, "http://127.0.0.1:9/b", ALL_EVENTS)
    url = settings.sqlalchemy_url
    claims = {}
    for name in ("succeeded", "failed", "lost", "lost-cancelled"):
        job_id = submit(settings, org="acme")
        with session_scope(url) as session:
            claims[name] = job_runs.claim_job(
                session, job_id=job_id, worker="w", lease_seconds=60, max_attempts=1
            )
    with session_scope(url) as session:
        publishing.complete_job(
            session, claim=claims["succeeded"], storage_key="adapters/x", sha256="a" * 64,
            size_bytes=1, trained_tokens=1,
        )  # fmt: skip
        job_runs.end_run(
            session, claim=claims["failed"], status=JobStatus.FAILED, error={"message": "x"}
        )
        session.get_one(Job, claims["lost-cancelled"].job_id).cancel_requested = True
    monkeypatch.setattr(job_runs, "clock", lambda: utcnow() + timedelta(seconds=3600))
    with session_scope(url) as session:
        job_runs.sweep(session, requeue_after_seconds=300, max_attempts=1)
    events = {
        (json.loads(row.payload)["data"]["id"], row.event_type, row.endpoint_id)
        for row in deliveries(settings)
    }
    hooks = [row["id"] for row in client.get("/v1/webhooks").json()["data"]]
    assert events == {
        (claims["succeeded"].job_id, "fine_tuning.job.succeeded", hooks[0]),
        (claims["succeeded"].job_id, "fine_tuning.job.succeeded", hooks[1]),
        (claims["failed"].job_id, "fine_tuning.job.failed", hooks[1]),
        (claims["lost"].job_id, "fine_tuning.job.failed", hooks[1]),
        (claims["lost-cancelled"].job_id, "fine_tuning.job.cancelled", hooks[1]),
    }
    cancel_queued_job(settings, org="globex")
    assert len(deliveries(settings)) == 5
    assert sorted(woken) == sorted(row.id for row in deliveries(settings))


# --- delivery --------------------------------------------------------------------------------


def test_delivery_verifies_with_standardwebhooks_and_the_openai_sdk(client, private_ok) -> None:
    settings = private_ok
    with receiving(Receiver(free_port())) as receiver:
        secret = create_webhook(client, receiver.url).json()["secret"]
        job_id = cancel_queued_job(settings)
        [row] = deliveries(settings, job_id)
        assert delivery.deliver(settings, row.id) == DeliveryStatus.DELIVERED
    [got] = receiver.requests
    assert got.headers["webhook-id"] == row.id
    assert got.headers["content-type"] == "application/json"
    event = Webhook(secret).verify(got.body, got.headers)
    assert event["type"] == "fine_tuning.job.cancelled" and event["data"]["id"] == job_id
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    sdk.webhooks.verify_signature(got.body, got.headers, secret=secret)
    unwrapped = sdk.webhooks.unwrap(got.body, got.headers, secret=secret)
    assert unwrapped.type == "fine_tuning.job.cancelled" and unwrapped.data.id == job_id
    # a wrong secret or a changed body is refused by both
    other = "whsec_" + secret[6:][::-1]
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(got.body, got.headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(
            got.body.replace(b"cancelled", b"succeeded"), got.headers, secret=secret
        )
    assert delivery.deliver(settings, row.id) is None  # delivered: never sent again


def test_a_receiver_that_starts_after_the_job_ended_still_gets_it(
    client, private_ok, clock
) -> None:
    settings = private_ok
    receiver = Receiver(free_port())  # nothing listens there yet
    secret = create_webhook(client, receiver.url).json()["secret"]
    job_id = cancel_queued_job(settings)
    [row] = deliveries(settings, job_id)
    assert delivery.deliver(settings, row.id) == DeliveryStatus.PENDING  # refused: down
    assert delivery.deliver(settings, row.id) is None  # the next attempt is not due yet
    clock.advance(delivery.SCHEDULE[1])
    assert resend_due(settings) == [row.id]  # the sweep wakes it when due...
    assert resend_due(settings) == []  # ...once
    assert delivery.deliver(settings, row.id) == DeliveryStatus.PENDING  # still down
    clock.advance(delivery.SCHEDULE[2])
    with receiving(receiver):
        assert resend_due(settings) == [row.id]
        assert delivery.deliver(settings, row.id) == DeliveryStatus.DELIVERED
    [got] = receiver.requests
    assert Webhook(secret).verify(got.body, got.headers)["data"]["id"] == job_id
    listed = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"]
    [shown] = listed
    assert shown["id"] == row.id and shown["status"] == "delivered"
    assert shown["next_attempt_at"] is None and shown["delivered_at"] is not None
    codes = [attempt["status_code"] for attempt in shown["attempts"]]
    assert codes == [None, None, 200]
    assert all("ConnectError" in a["error"] for a in shown["attempts"][:2])


def resend_due(settings) -> list[str]:
    from app.jobs.sweep import resend_due_webhooks

    return resend_due_webhooks(settings)


def test_retries_keep_the_webhook_id_and_body(client, private_ok, clock) -> None:
    settings = private_ok
    with receiving(Receiver(free_port(), answers=[500, 503])) as receiver:
        secret = create_webhook(client, receiver.url).json()["secret"]
        [row] = deliveries(settings, cancel_queued_job(settings))
        for attempt in range(3):
            clock.advance(delivery.SCHEDULE[attempt])
            delivery.deliver(settings, row.id)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [row.id] * 3
    assert len({r.body for r in receiver.requests}) == 1
    assert all(Webhook(secret).verify(r.body, r.headers) for r in receiver.requests)
    shown = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"][0]
    assert [a["status_code"] for a in shown["attempts"]] == [500, 503, 200]


def test_a_delivery_fails_for_good_after_the_schedule(client, private_ok, clock) -> None:
    settings = private_ok
    receiver = Receiver(free_port())
    create_webhook(client, receiver.url)
    [row] = deliveries(settings, cancel_queued_job(settings))
    for wait in delivery.SCHEDULE:
        clock.advance(wait)
        status = delivery.deliver(settings, row.id)
    assert status == DeliveryStatus.FAILED
    clock.advance(10 * 86400)
    assert delivery.deliver(settings, row.id) is None
    assert resend_due(settings) == []


def test_redirects_are_not_followed(client, private_ok) -> None:
    settings = private_ok
    with receiving(Receiver(free_port(), answers=[302])) as receiver:
        create_webhook(client, receiver.url)
        [row] = deliveries(settings, cancel_queued_job(settings))
        assert delivery.deliver(settings, row.id) == DeliveryStatus.PENDING
    assert len(receiver.requests) == 1  # the Location was never fetched
    shown = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"][0]
    assert shown["attempts"][0]["status_code"] == 302
    assert "redirect" in shown["attempts"][0]["error"]


def test_the_address_is_checked_again_at_delivery(client, private_ok) -> None:
    settings = private_ok
    with receiving(Receiver(free_port())) as receiver:
        create_webhook(client, receiver.url)  # allowed when created...
        [row] = deliveries(settings, cancel_queued_job(settings))
        settings.webhook_allow_private = False  # ...refused when sent
        assert delivery.deliver(settings, row.id) == DeliveryStatus.PENDING
    assert receiver.requests == []
    shown = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"][0]
    assert "LORAFORGE_WEBHOOK_ALLOW_PRIVATE" in shown["attempts"][0]["error"]


def test_deleting_an_endpoint_stops_its_deliveries(client, private_ok) -> None:
    settings = private_ok
    with receiving(Receiver(free_port())) as receiver:
        hook = create_webhook(client, receiver.url).json()["id"]
        [row] = deliveries(settings, cancel_queued_job(settings))
        assert client.delete(f"/v1/webhooks/{hook}").status_code == 200
        assert delivery.deliver(settings, row.id) is None
    assert receiver.requests == []


@pytest.fixture
def hook_test_resolves_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hook.test` (a name no DNS knows) resolves to 127.0.0.1 for the SSRF check only: a
    delivery that reaches it connected to the checked address, not to a fresh lookup."""

    def resolve(host: str, port: int, **_: object) -> list:
        assert host == "hook.test", host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(urls, "lookup", resolve)


@pytest.mark.usefixtures("hook_test_resolves_to_loopback")
@pytest.mark.parametrize("certificate_for", ["hook.test", "elsewhere.test"])
def test_https_goes_to_the_checked_address_under_the_urls_name(
    client, private_ok, tmp_path, certificate_for
) -> None:
    """TLS is verified against the URL's host (SNI and certificate), the Host header names
    it, and the connection goes to the address the check resolved."""
    settings = private_ok
    server_tls, trusting = self_signed(tmp_path, certificate_for)
    with receiving(Receiver(free_port()), tls=server_tls) as receiver:
        url = f"https://hook.test:{receiver.port}/hook"
        secret = create_webhook(client, url).json()["secret"]
        [row] = deliveries(settings, cancel_queued_job(settings))
        transport = httpx.HTTPTransport(verify=trusting)
        status = delivery.deliver(settings, row.id, transport=transport)
    if certificate_for == "hook.test":
        assert status == DeliveryStatus.DELIVERED
        [got] = receiver.requests
        assert got.headers["host"] == f"hook.test:{receiver.port}"
        assert Webhook(secret).verify(got.body, got.headers)["data"]["id"]
    else:  # a certificate for another name is refused: nothing is sent
        assert status == DeliveryStatus.PENDING and receiver.requests == []
        shown = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"][0]
        assert "certificate" in shown["attempts"][0]["error"].lower()


def test_an_attempt_that_raises_is_recorded_and_retried(client, private_ok, monkeypatch) -> None:
    settings = private_ok
    create_webhook(client, "http://127.0.0.1:9/hook")
    [row] = deliveries(settings, cancel_queued_job(settings))

    def no_signer(**_: object) -> dict[str, str]:
        raise RuntimeError("pip install loraforge[webhooks]")

    monkeypatch.setattr(delivery, "signed_headers", no_signer)
    assert delivery.deliver(settings, row.id) == DeliveryStatus.PENDING
    shown = client.get(f"/v1/webhooks/{row.endpoint_id}/deliveries").json()["data"][0]
    assert "could not send" in shown["attempts"][0]["error"]
    assert shown["next_attempt_at"] is not None
