"""LORAFORGE_PRELOAD_ADAPTERS: look the adapters up in the registry and load them, pinned.

An id the registry does not know (or knows as deleted), or one whose base model cannot load,
is logged and skipped, so a stale setting never stops the API from starting.
"""

from __future__ import annotations

import logging
from typing import Any

from app.db.session import session_scope
from app.errors import IntegrityFailure, NotFound, ServiceUnavailable
from app.inference.adapter_cache import adapter_cache
from app.inference.types import AdapterRef
from app.registry import service as registry
from app.storage import open_store

logger = logging.getLogger(__name__)


def preload_adapters(engine: Any, settings: Any) -> list[str]:
    """Start loading every configured adapter; return the ids that were found."""
    wanted = list(settings.preload_adapters)
    if not wanted:
        return []
    cache = adapter_cache(
        open_store(settings), data_dir=settings.data_dir, max_bytes=settings.adapter_cache_bytes
    )
    with session_scope(settings.sqlalchemy_url) as session:
        rows = [
            (row.id, row.base_model, row.storage_key, row.sha256, row.organization_id)
            for row in registry.find_adapters(session, model_ids=wanted)
        ]
    refs = {}
    for model_id, base_model, key, sha256, owner in rows:  # fetched with no session open
        try:
            folder = cache.folder(model_id=model_id, key=key, sha256=sha256)
        except IntegrityFailure as exc:
            logger.warning("LORAFORGE_PRELOAD_ADAPTERS: skipped: %s", exc.message)
            continue
        refs[model_id] = (base_model, AdapterRef(model_id, folder, sha256, owner=owner))
    found = {row[0] for row in rows}
    for missing in [i for i in wanted if i not in found]:
        logger.warning("LORAFORGE_PRELOAD_ADAPTERS: %s is not an active adapter; skipped", missing)
    by_base: dict[str, list[AdapterRef]] = {}
    for base_model, ref in refs.values():
        by_base.setdefault(base_model, []).append(ref)
    for base_model, adapters in by_base.items():
        try:
            engine.preload(base_model, adapters)
        except NotFound:
            logger.warning("LORAFORGE_PRELOAD_ADAPTERS: base model %s is not served", base_model)
        except ServiceUnavailable as exc:  # a base that cannot load (app/base_models.py)
            logger.warning("LORAFORGE_PRELOAD_ADAPTERS: skipped: %s", exc.message)
    return [i for i in wanted if i in refs]
