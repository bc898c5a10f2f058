"""Replicas stay consistent through the registry: each inference process re-reads, every
`LORAFORGE_REGISTRY_WATCH_SECONDS` (≤ 1 s), the rows of the adapters its engine holds, and
drops those deleted or pruned through any other replica (docs/design.md §2.1).

A request is resolved against the registry row when it arrives (`registry.resolve_model`),
so a new request for a model deleted anywhere is refused at once; this watch covers what an
engine already holds: the weights are freed and requests still waiting for them are refused,
as the replica that took the delete does (`InferenceEngine.unload_adapter`). Rows already
running finish there too. One indexed query per interval, and none while nothing is held.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app.config import Settings
from app.db.session import read_session_scope
from app.registry import service as registry

if TYPE_CHECKING:
    from app.inference.engine import InferenceEngine

logger = logging.getLogger(__name__)


def drop_gone_adapters(engine: InferenceEngine, url: str) -> list[str]:
    """Unload the held adapters (and checkpoints) the registry no longer lists as active."""
    held = engine.held_adapters()
    if not held:
        return []
    with read_session_scope(url) as session:
        live = registry.live_model_ids(session, model_ids=held)
    gone = [model_id for model_id in held if model_id not in live]
    for model_id in gone:
        engine.unload_adapter(model_id)
    if gone:
        logger.info("dropped adapters deleted or pruned elsewhere: %s", gone)
    return gone


def start_registry_watch(app: FastAPI, settings: Settings) -> threading.Event:
    """Run `drop_gone_adapters` on the app's engine (once there is one) every interval."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.registry_watch_seconds):
            engine: InferenceEngine | None = getattr(app.state, "engine", None)
            if engine is None:
                continue
            try:
                drop_gone_adapters(engine, settings.sqlalchemy_url)
            except Exception:  # the database away: retried next interval
                logger.warning("registry watch failed; retrying", exc_info=True)

    threading.Thread(target=loop, name="loraforge-registry-watch", daemon=True).start()
    return stop
