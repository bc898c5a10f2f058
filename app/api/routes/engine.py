"""GET /v1/engine/adapters: what this API process's inference engine holds, and its counters.

Shows only the caller's organization's adapters (hits, misses, last use, requests and
tokens, resident or not) and, per base model, the batch state and the KV cache: the budget
(the same for everyone) and the caller's own running, reserved and waiting requests, never
another organization's. Never starts the engine.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import OrgDep
from app.schemas.inference import EngineAdapters

router = APIRouter(prefix="/v1/engine", tags=["engine"])


@router.get("/adapters", response_model=EngineAdapters)
def list_engine_adapters(request: Request, org: OrgDep) -> EngineAdapters:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return EngineAdapters(data=[], base_models=[])
    stats = engine.stats(owner=org.id)
    return EngineAdapters(data=stats["adapters"], base_models=stats["base_models"])
