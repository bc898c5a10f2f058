"""Request dependencies: settings, session, caller's organization, store, engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app import tenancy
from app.config import Settings, get_settings
from app.db.models import Organization
from app.db.session import session_scope
from app.errors import ServiceUnavailable, Unauthorized
from app.storage import ArtifactStore

if TYPE_CHECKING:
    from app.inference.engine import InferenceEngine

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(settings.sqlalchemy_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_organization(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Organization:
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    return tenancy.authenticate(session, secret=secret.strip())


OrgDep = Annotated[Organization, Depends(current_organization)]


def get_store(settings: SettingsDep) -> ArtifactStore:
    return ArtifactStore(settings.artifacts_dir)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_engine_lock = threading.Lock()


def get_engine(request: Request, settings: SettingsDep) -> InferenceEngine:
    """The process's inference engine, created on the first inference request."""
    if not settings.inference_enabled:
        raise ServiceUnavailable(
            "inference is disabled on this server (LORAFORGE_INFERENCE_ENABLED)"
        )
    with _engine_lock:
        if getattr(request.app.state, "engine", None) is None:
            from app.inference.engine import InferenceEngine  # lazy: torch loads here

            request.app.state.engine = InferenceEngine(
                base_models=settings.base_models,
                max_loaded_adapters=settings.max_loaded_adapters,
                device=settings.device,
            )
    return request.app.state.engine


EngineDep = Annotated["InferenceEngine", Depends(get_engine)]
