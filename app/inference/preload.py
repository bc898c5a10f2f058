"""LORAFORGE_PRELOAD_ADAPTERS: look the adapters up in the registry and load them, pinned.

An id the registry does not know (or knows as deleted), or one whose base model cannot load,
is logged and skipped, so a stale setting never stops the API from starting.
"""

from __future__ import annotations

import logging
from typing import Any

from app.db.session import session_scope
from app.errors import NotFound, ServiceUnavailable
from app.inference.types import AdapterRef
from app.registry import service as registry
from app.storage import ArtifactStore

logger = logging.getLogger(__name__)


def preload_adapters(engine: Any, settings: Any) -> list[str]:
    """Start loading every configured adapter; return the ids that were found."""
    wanted = list(settings.preload_adapters)
    if not wanted:
        return []
    store = ArtifactStore(settings.artifacts_dir)
    with session_scope(settings.sqlalchemy_url) as session:
        rows = registry.find_adapters(session, model_ids=wanted)
        refs = {
            row.id: (
                row.base_model,
                AdapterRef(
                    row.id, store.path(row.storage_key), row.sha256, owner=row.organization_id
                ),
            )
            for row in rows
        }
    for missing in [i for i in wanted if i not in refs]:
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
