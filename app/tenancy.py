"""Organizations and API keys. Keys are random secrets stored only as sha256."""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Organization
from app.errors import InvalidRequest, NotFound, Unauthorized
from app.ids import new_id, new_secret

ORG_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_organization(session: Session, *, name: str) -> Organization:
    if not ORG_NAME.match(name):
        raise InvalidRequest(
            "organization names are 1-40 lowercase letters, digits or '-', starting with a "
            f"letter or digit; got {name!r}",
            param="org",
        )
    org = session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        org = Organization(id=new_id("org"), name=name)
        session.add(org)
        session.flush()
    return org


def create_api_key(session: Session, *, organization: Organization) -> str:
    """Store a new key's hash; the plaintext is returned once and never stored."""
    return issue_api_key(session, organization=organization)[1]


def issue_api_key(session: Session, *, organization: Organization) -> tuple[ApiKey, str]:
    """The new key's row and its plaintext secret (returned once, never stored)."""
    secret = new_secret()
    key = ApiKey(
        id=new_id("key"),
        organization_id=organization.id,
        key_hash=hash_key(secret),
        prefix=secret[:8],
    )
    session.add(key)
    session.flush()
    return key, secret


def authenticate(session: Session, *, secret: str) -> Organization:
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    )
    if key is None:
        raise Unauthorized("Incorrect API key provided.")
    return session.get_one(Organization, key.organization_id)


def key_is_active(session: Session, *, key_sha256: str) -> bool:
    """Whether a key (by its hash) still authenticates; a stream re-checks its key with it."""
    query = select(ApiKey.id).where(ApiKey.key_hash == key_sha256, ApiKey.revoked_at.is_(None))
    return session.scalar(query) is not None


def list_api_keys(session: Session, *, organization: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (revoked ones too) with its organization's name; never a secret."""
    query = select(ApiKey, Organization.name).join(
        Organization, Organization.id == ApiKey.organization_id
    )
    if organization is not None:
        query = query.where(Organization.name == organization)
    rows = session.execute(query.order_by(ApiKey.created_at, ApiKey.id))
    return [(key, name) for key, name in rows]


def organization_name(session: Session, key: ApiKey) -> str:
    return session.get_one(Organization, key.organization_id).name


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke any organization's key (admin and CLI); idempotent."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"No such API key: {key_id}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key
