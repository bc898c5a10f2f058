"""GET /metrics: Prometheus metrics, behind the admin key (docs/design.md §12).

Mounted by every process that serves HTTP (the api, and a `serve` role when there is one);
the metrics themselves are in `app/observability/metrics.py`. Never starts the engine.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import AdminDep, SettingsDep
from app.observability import metrics

router = APIRouter(tags=["metrics"], dependencies=[AdminDep])


@router.get("/metrics", response_class=Response)
def scrape(request: Request, settings: SettingsDep) -> Response:
    body = metrics.exposition(
        url=settings.sqlalchemy_url, engine=getattr(request.app.state, "engine", None)
    )
    return Response(body, media_type=metrics.CONTENT_TYPE)
