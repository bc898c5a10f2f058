"""Request dependencies: settings, session, caller's organization, store, engine."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import tenancy
from app.api.errors import unrecognized_arguments
from app.api.rate_limit import TokenBuckets
from app.config import Settings, get_settings
from app.db.models import Organization
from app.db.session import read_session_scope, session_scope
from app.errors import Forbidden, InvalidRequest, ServiceUnavailable, Unauthorized
from app.storage import ArtifactStore, open_store

if TYPE_CHECKING:
    from app.inference.engine import InferenceEngine

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(settings.sqlalchemy_url) as session:
        yield session


# scope="function": closed as soon as the route returns, before the response is sent, so a
# slow reader of the response never holds a pooled connection.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_read_session(settings: SettingsDep) -> Iterator[Session]:
    with read_session_scope(settings.sqlalchemy_url) as session:
        yield session


# Routes that only read (GETs, inference, authentication) take this one: on SQLite it never
# waits for the write lock, so reads do not queue behind each other or behind a worker.
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


# Declared as the OpenAPI security scheme; errors are ours (401 in OpenAI's envelope).
_bearer = HTTPBearer(auto_error=False, description="An API key from `loraforge keys create`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def bearer_secret(credentials: HTTPAuthorizationCredentials | None) -> str:
    secret = credentials.credentials.strip() if credentials is not None else ""
    if not secret:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    return secret


def current_organization(
    request: Request, settings: SettingsDep, credentials: BearerDep
) -> Organization:
    """The caller's organization; each call spends one token of its rate-limit bucket.

    The key is looked up in a session of its own, closed before the route runs: no request
    holds a database connection while it waits on the network (an upload's body, a stream's
    reader). The key's hash is kept on the request for re-checks during a stream.
    """
    secret = bearer_secret(credentials)
    with read_session_scope(settings.sqlalchemy_url) as session:
        org = tenancy.authenticate(session, secret=secret)
    request.state.key_sha256 = tenancy.hash_key(secret)
    limiter: TokenBuckets = request.app.state.rate_limiter
    limiter.take(org.id, rate=settings.rate_limit_per_second, burst=settings.rate_limit_burst)
    return org


OrgDep = Annotated[Organization, Depends(current_organization)]


def require_admin(settings: SettingsDep, credentials: BearerDep) -> None:
    """Admin routes take the admin key only (LORAFORGE_ADMIN_KEY), compared in constant time.

    Settings keep only the key's sha256, so the plaintext is not held by the process.
    A tenant key, a wrong key and an unconfigured admin key all get the same 403.
    """
    offered = tenancy.hash_key(bearer_secret(credentials))
    expected = settings.admin_key_sha256
    if expected is None or not hmac.compare_digest(offered, expected):
        raise Forbidden("this route needs the admin key")


AdminDep = Depends(require_admin)


def get_store(settings: SettingsDep) -> ArtifactStore:
    return open_store(settings)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_engine_lock = threading.Lock()


def get_inference_engine(request: Request, settings: SettingsDep) -> InferenceEngine:
    """The process's inference engine, created on the first inference request."""
    if not settings.inference_enabled:
        raise ServiceUnavailable(
            "inference is disabled on this server (LORAFORGE_INFERENCE_ENABLED)"
        )
    return engine_for(request.app, settings)


def engine_for(app: FastAPI, settings: Settings) -> InferenceEngine:
    """The app's engine, created once; LORAFORGE_PRELOAD_ADAPTERS start loading (pinned)."""
    with _engine_lock:
        engine: InferenceEngine | None = getattr(app.state, "engine", None)
        if engine is None:
            from app.inference.engine import InferenceEngine  # lazy: torch loads here
            from app.inference.preload import preload_adapters

            engine = InferenceEngine(
                base_models=settings.base_models,
                quantized=settings.serving_quantization,
                max_loaded_adapters=settings.max_loaded_adapters,
                max_batch_size=settings.max_batch_size,
                device=settings.device,
                max_requests_per_owner=settings.max_inference_requests_per_org,
                batch_share_per_owner=settings.inference_batch_share_per_org,
                scheduler_nice=settings.inference_thread_nice,
                kv_cache_fraction=settings.kv_cache_fraction,
                kv_cache_org_share=settings.kv_cache_org_share,
            )
            preload_adapters(engine, settings)
            app.state.engine = engine
    return engine


EngineDep = Annotated["InferenceEngine", Depends(get_inference_engine)]


def forbid_unknown_query(request: Request) -> None:
    """Unknown query parameters are refused and named, like body fields (docs/design.md §3)."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    allowed = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        names = [name[:64] for name in unknown]
        raise InvalidRequest(unrecognized_arguments(names), param=names[0])


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route declares, its sub-dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


StrictQuery = Depends(forbid_unknown_query)
