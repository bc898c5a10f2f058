"""create_app(): the FastAPI application of a role: `api` (the control plane, and inference
unless disabled) or `serve` (inference only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, FastAPI
from sqlalchemy import text

from app.api.deps import StrictQuery, engine_for
from app.api.errors import install_error_handlers
from app.api.limits import BodyLimits, RequestBodyLimits
from app.api.rate_limit import TokenBuckets
from app.api.responses import ERROR_RESPONSES
from app.api.routes import admin, engine, files, inference, jobs, metrics, models, webhooks
from app.base_models import report
from app.config import Settings, get_settings
from app.db.session import read_session_scope
from app.inference.registry_watch import start_registry_watch
from app.jobs.sweep import start_sweeper
from app.observability.metrics import limit_adapter_labels
from app.ui.files import dashboard_files

Role = Literal["api", "serve"]
# What each role mounts (docs/design.md §2.1). The api is the control plane (and serves
# inference unless LORAFORGE_INFERENCE_ENABLED=false); serve is inference only.
ROUTERS: dict[Role, tuple[APIRouter, ...]] = {
    "api": (
        files.router,
        jobs.router,
        models.router,
        models.catalog,
        inference.router,
        engine.router,
        admin.router,
        metrics.router,
        webhooks.router,
    ),
    "serve": (models.catalog, inference.router, engine.router, metrics.router),
}


def create_serve_app() -> FastAPI:
    """The inference-only app of `loraforge serve` (a uvicorn factory takes no argument)."""
    return create_app(role="serve")


def create_app(settings: Settings | None = None, role: Role = "api") -> FastAPI:
    settings = settings or get_settings()
    control_plane = role == "api"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        report(settings.base_models)  # logs each allowlist entry that cannot load, and why
        sweeping = control_plane and settings.sweep_interval_seconds > 0
        stops = [start_sweeper(settings)] if sweeping else []
        if settings.inference_enabled:
            stops.append(start_registry_watch(app, settings))  # deletes made elsewhere
            if settings.preload_adapters:
                engine_for(app, settings)  # preloaded adapters are warm before the first request
        yield
        for stop in stops:
            stop.set()
        if app.state.engine is not None:
            app.state.engine.close()

    app = FastAPI(title="loraforge", version="0.1.0", lifespan=lifespan)
    limit_adapter_labels(settings.metrics_adapter_labels)
    app.state.engine = None
    app.state.rate_limiter = TokenBuckets()
    install_error_handlers(app)
    app.add_middleware(RequestBodyLimits, limits=body_limits(settings))
    for router in ROUTERS[role]:
        # Every route declares the error envelope it may answer (schema conformance).
        app.include_router(router, responses=ERROR_RESPONSES, dependencies=[StrictQuery])
    if control_plane:
        app.mount("/ui", dashboard_files(), name="ui")  # the web dashboard (app/ui)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        # read-only: on SQLite it never waits for the write lock (BEGIN IMMEDIATE)
        with read_session_scope(settings.sqlalchemy_url) as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app


def body_limits(settings: Settings) -> BodyLimits:
    return BodyLimits(
        max_upload_bytes=settings.max_upload_bytes,
        max_request_bytes=settings.max_request_bytes,
        idle_seconds=settings.body_idle_timeout_seconds,
        min_bytes_per_second=settings.body_min_bytes_per_second,
    )
