"""Schemathesis against our OpenAPI schema, in process (ASGI), with a tenant's key.

All checks, positive and negative data, then the stateful phase over the links the
schema implies: 0 server errors and 0 schema violations. Examples per operation are
bounded so the whole run stays near a minute on 2 cores.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config._checks import PositiveDataAcceptanceConfig

from tests.api.conftest import api_key
from tests.factories import api_app, chat_rows, jsonl, upload

pytestmark = pytest.mark.slow
FUZZ = hypothesis_settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture
def settings(backend):
    """Both databases: PostgreSQL refuses what SQLite takes (a NUL in text, a 32-bit
    overflow), so a 500 may exist on one only."""
    return backend


@pytest.fixture
def fuzz_app(settings, enqueued, monkeypatch):  # noqa: ARG001
    app = api_app(settings)
    settings.rate_limit_per_second = 0  # fuzzing is a flood by design
    # No worker runs here, so a job's event stream (`stream=true`) would last its whole
    # bound: keep the fuzzed streams to a moment.
    monkeypatch.setattr("app.jobs.event_feed.STREAM_MAX_SECONDS", 0.5)
    # Fuzzed webhook URLs must not become DNS queries that leave the machine.
    monkeypatch.setattr("app.webhooks.urls.lookup", literal_addresses_only)
    return app


def literal_addresses_only(host: str, port: int, **_: object) -> list:
    """getaddrinfo for IP literals (no lookup); every name "does not resolve"."""
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, "not resolved in tests") from None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return [(family, socket.SOCK_STREAM, 6, "", (str(ip), port))]


def tenant(app, settings, name: str) -> dict[str, str]:
    """A new organization's key, with one valid dataset so job creation can succeed too."""
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {api_key(settings, name)}"}
    with TestClient(app, headers=headers) as client:
        upload(client, jsonl(chat_rows(5)))
    return headers


@pytest.fixture
def auth(fuzz_app, settings) -> dict[str, str]:
    return tenant(fuzz_app, settings, "acme")


@pytest.fixture
def api_schema(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    schema.config.checks.update(included_check_names=["all"])
    # Schema-valid is not always acceptable here: a JSONL file's lines, whether an id exists
    # in the caller's organization, or a model is on the allowlist cannot be written in
    # JSON Schema, and such requests answer 400 naming the field (OpenAI's behaviour).
    schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
        expected_statuses=["2xx", "400", "401", "403", "404", "409", "413", "422", "429"]
    )
    return schema


def fuzz(operation, mode: GenerationMode, auth: dict[str, str]) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(headers=auth)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_responses_match_the_schema(api_schema, auth, mode) -> None:
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        try:
            fuzz(operation, mode, auth)
        except Unsatisfiable:  # no negative data exists (GET /health has no inputs)
            continue
        except Exception as exc:  # collect them all, then fail with every operation named
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_stateful_sequences_follow_the_links(api_schema, fuzz_app, settings) -> None:
    """Create → read / cancel / delete chains over the links schemathesis infers.

    Each scenario runs in an organization of its own: what earlier scenarios stored (files,
    jobs counted by the quotas) would otherwise change the answers when Hypothesis replays
    a scenario, and a real failure would be reported as flaky data generation."""
    machine = api_schema.as_state_machine()
    assert len(machine.bundles) >= 5, "no links: the stateful phase would test nothing"
    scenarios = itertools.count()

    class Machine(machine):
        def setup(self) -> None:
            self.headers = tenant(fuzz_app, settings, f"scenario-{next(scenarios)}")

        def get_call_kwargs(self, case) -> dict:
            return {"headers": self.headers}

    Machine.run(
        settings=hypothesis_settings(
            max_examples=20,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )
