"""API keys: admin API (admin key only), CLI list/revoke, revoked keys refused, no secret stored."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select

from app import tenancy
from app.config import get_settings
from app.db.models import ApiKey
from app.db.session import get_engine, session_scope
from app.errors import Unauthorized
from tests.api.conftest import api_key
from tests.conftest import make_settings
from tests.factories import api_app

ADMIN = "adm-" + "s3cr3t" * 6


@pytest.fixture
def admin_settings(settings):
    return make_settings(
        settings.data_dir, settings.base_models["tiny"], admin_key=ADMIN, database_url=None
    )


@pytest.fixture
def admin(admin_settings, enqueued):  # noqa: ARG001
    app = api_app(admin_settings)
    with TestClient(app) as test_client:
        yield test_client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def database_text(url: str) -> str:
    """Every value of every row of every table, as one string (a DB dump to grep)."""
    engine = get_engine(url)
    chunks = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.exec_driver_sql(f'SELECT * FROM "{table}"'):
                chunks.extend(str(value) for value in row)
    return "\n".join(chunks)


def test_admin_key_is_kept_only_as_a_hash(admin_settings) -> None:
    assert ADMIN not in admin_settings.model_dump_json()
    assert admin_settings.admin_key_sha256 == tenancy.hash_key(ADMIN)


def test_the_plaintext_leaves_the_environment_and_children_get_only_the_hash(monkeypatch, tmp_path):
    """What the README promises: after the settings are read, the process (and every child
    it spawns, as `loraforge up` does) holds only the key's sha256."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("LORAFORGE_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("LORAFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LORAFORGE_ADMIN_KEY_SHA256", raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().admin_key_sha256 == tenancy.hash_key(ADMIN)
        assert ADMIN not in "".join(os.environ.values())
        get_settings.cache_clear()  # a re-read (say, after --data-dir) keeps the admin key
        assert get_settings().admin_key_sha256 == tenancy.hash_key(ADMIN)
        child = subprocess.run(
            [sys.executable, "-c", "import os; from app.config import get_settings; "
             "print(get_settings().admin_key_sha256); print(sorted(os.environ.items()))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert child.stdout.splitlines()[0] == tenancy.hash_key(ADMIN)
        assert ADMIN not in child.stdout
    finally:
        os.environ.pop("LORAFORGE_ADMIN_KEY_SHA256", None)  # set by the code under test
        get_settings.cache_clear()


def test_admin_creates_lists_and_revokes_keys(admin, admin_settings):
    created = admin.post("/v1/admin/organizations/acme/keys", headers=bearer(ADMIN))
    assert created.status_code == 200, created.text
    key = created.json()
    secret = key.pop("secret")
    assert key["organization"] == "acme" and key["revoked_at"] is None
    assert admin.get("/v1/files", headers=bearer(secret)).status_code == 200
    listed = admin.get("/v1/admin/keys", headers=bearer(ADMIN), params={"organization": "acme"})
    assert listed.json()["data"] == [key]
    assert secret not in listed.text and tenancy.hash_key(secret) not in listed.text
    revoked = admin.post(f"/v1/admin/keys/{key['id']}/revoke", headers=bearer(ADMIN))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = admin.post(f"/v1/admin/keys/{key['id']}/revoke", headers=bearer(ADMIN))
    assert again.json() == revoked.json()  # idempotent
    refused = admin.get("/v1/files", headers=bearer(secret))
    unknown = admin.get("/v1/files", headers=bearer("lf-" + "x" * 43))
    assert refused.status_code == 401 and refused.content == unknown.content
    missing = admin.post("/v1/admin/keys/key-nope/revoke", headers=bearer(ADMIN))
    assert missing.status_code == 404
    dump = database_text(admin_settings.sqlalchemy_url)
    assert secret not in dump and secret[8:] not in dump and ADMIN not in dump


def test_admin_routes_refuse_tenant_wrong_and_missing_keys(admin, admin_settings):
    tenant = api_key(admin_settings, "acme")
    routes = [
        ("POST", "/v1/admin/organizations/acme/keys"),
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys/key-x/revoke"),
    ]
    for method, path in routes:
        for headers, status in [
            (bearer(tenant), 403),
            (bearer(ADMIN + "x"), 403),
            ({}, 401),
            ({"Authorization": f"Basic {ADMIN}"}, 401),
        ]:
            response = admin.request(method, path, headers=headers)
            assert response.status_code == status, (method, path, headers)
    with session_scope(admin_settings.sqlalchemy_url) as session:
        assert len(session.scalars(select(ApiKey)).all()) == 1  # only the tenant's own key


def test_admin_api_is_closed_when_no_admin_key_is_configured(client, settings):
    assert settings.admin_key_sha256 is None
    for secret in ("", "anything", api_key(settings, "globex")):
        response = client.get("/v1/admin/keys", headers=bearer(secret) if secret else {})
        assert response.status_code in (401, 403)
        assert response.status_code == 403 or not secret


@pytest.mark.slow
def test_cli_lists_and_revokes_keys(tmp_path, tiny_model_dir):
    from tests.e2e.stack import cli, stack_env

    env = stack_env(tmp_path / "data", tiny_model_dir)
    cli(env, "db", "upgrade")
    secret = cli(env, "keys", "create", "--org", "acme").strip()
    cli(env, "keys", "create", "--org", "globex")
    listing = cli(env, "keys", "list", "--org", "acme").strip().splitlines()
    assert len(listing) == 1 and "\tacme\t" in listing[0] and secret not in listing[0]
    key_id = listing[0].split("\t")[0]
    assert cli(env, "keys", "revoke", key_id).strip() == f"revoked {key_id}"
    assert listing[0].split("\t")[-1] == "-"
    assert cli(env, "keys", "list", "--org", "acme").strip().split("\t")[-1] != "-"
    assert len(cli(env, "keys", "list").strip().splitlines()) == 2
    url = f"sqlite:///{tmp_path / 'data' / 'loraforge.db'}"
    with session_scope(url) as session, pytest.raises(Unauthorized):
        tenancy.authenticate(session, secret=secret)
    assert secret not in database_text(url)
