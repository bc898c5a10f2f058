"""Idempotency-Key on `POST /v1/files` and `POST /v1/fine_tuning/jobs`.

A key is scoped to (organization, endpoint): another organization's identical key is a
different key. A replay with the same request returns the object the first request
created (its current state; 409 `idempotent_object_deleted` once it has been deleted),
never a second one. The same key with a different request
is refused with 422 `idempotency_key_reused` (Stripe's and the IETF draft's choice). The
key row is written in the same transaction as the object, so a key never points at
nothing; two concurrent first requests race on the primary key and the loser replays.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Annotated, TypedDict, TypeVar

from fastapi import Header
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey, Organization
from app.db.session import commit
from app.errors import IdempotencyKeyReused, InvalidRequest, InvalidState, NotFound

KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as HTTP headers carry

IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]
T = TypeVar("T")


class Scope(TypedDict):
    """One request's key and digest: the keyword arguments of `replayed_id` and `commit_once`."""

    organization: Organization
    endpoint: str
    key: str | None
    digest: str


def request_sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def check_key(key: str | None) -> str | None:
    if key is not None and not KEY_PATTERN.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters", param="Idempotency-Key"
        )
    return key


def replayed_id(
    session: Session, *, organization: Organization, endpoint: str, key: str | None, digest: str
) -> str | None:
    """The id created by an earlier request with this key, or None for a first request."""
    if check_key(key) is None:
        return None
    row = session.get(IdempotencyKey, (organization.id, endpoint, key))
    if row is None:
        return None
    if row.request_sha256 != digest:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used with a different request",
            param="Idempotency-Key",
        )
    return row.object_id


def commit_once(
    session: Session,
    *,
    organization: Organization,
    endpoint: str,
    key: str | None,
    digest: str,
    object_id: str,
    undo: Callable[[], None] = lambda: None,
) -> str:
    """Commit the new object with its key; if a concurrent request won the key, replay it.

    `undo` removes side effects outside the database (a published file) of the loser.
    """
    if key is None:
        commit(session)
        return object_id
    session.add(
        IdempotencyKey(
            organization_id=organization.id,
            endpoint=endpoint,
            key=key,
            request_sha256=digest,
            object_id=object_id,
        )
    )
    try:
        commit(session)
    except IntegrityError:
        session.rollback()
        undo()
        winner = replayed_id(
            session, organization=organization, endpoint=endpoint, key=key, digest=digest
        )
        if winner is None:
            raise
        return winner
    return object_id


def current(fetch: Callable[[str], T], object_id: str, *, kind: str) -> T:
    """The object created under the key, as it is now; 409 if it has since been deleted.

    A replay must not answer 404 as if the request had named a missing object: it names
    nothing, and creating a second object would break the key's promise.
    """
    try:
        return fetch(object_id)
    except NotFound:
        raise InvalidState(
            f"the {kind} {object_id} created with this Idempotency-Key has been deleted; "
            "send a new key to create another",
            param="Idempotency-Key",
            code="idempotent_object_deleted",
        ) from None
