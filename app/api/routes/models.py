from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app import base_models
from app.api.deps import OrgDep, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from app.api.views import adapter_view, base_model_view, checkpoint_model_view
from app.db.session import commit
from app.errors import InvalidRequest, adapter_weights_changed
from app.registry import service as registry
from app.registry.download import (
    ARCHIVE_SHA256_HEADER,
    WEIGHTS_SHA256_HEADER,
    adapter_archive,
    public_base_name,
)
from app.schemas.common import Id, ListPage
from app.schemas.models import ModelDeleted, ModelRead
from app.storage import ArtifactCorrupt, ArtifactMissing

if TYPE_CHECKING:
    from app.inference.engine import InferenceEngine

# `catalog` (list, retrieve) is what every role that serves inference mounts; `router`
# (download, delete) is the control plane's. The api mounts `router` first: its download
# route must come before the catalog's plain retrieve (model ids may contain '/').
router = APIRouter(prefix="/v1/models", tags=["models"])
catalog = APIRouter(prefix="/v1/models", tags=["models"])


@catalog.get("", response_model=ListPage[ModelRead])
def list_models(org: OrgDep, session: ReadSessionDep, settings: SettingsDep) -> ListPage[ModelRead]:
    # An entry that cannot load (a typo'd path, an uncached hub id offline) is not offered.
    bases = [base_model_view(name) for name in base_models.usable(settings.base_models)]
    adapters = [
        adapter_view(row, org.name) for row in registry.list_adapters(session, organization=org)
    ]
    return ListPage(data=bases + adapters)


@router.get(
    "/{model_id:path}/adapter",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "The PEFT adapter"}},
)
def download_adapter(
    model_id: Id, org: OrgDep, session: ReadSessionDep, settings: SettingsDep, store: StoreDep
) -> StreamingResponse:
    target = registry.resolve_model(
        session, organization=org, model_id=model_id, base_models=settings.base_models
    )
    stored = target.adapter
    if stored is None:
        raise InvalidRequest(
            f"{model_id!r} is a base model; only adapters can be downloaded", param="model"
        )
    base = public_base_name(target.base_model, settings.base_models.get(target.base_model))
    try:
        archive = adapter_archive(
            store, stored.storage_key, base_model=base, weights_sha256=stored.sha256
        )
    except (ArtifactMissing, ArtifactCorrupt) as exc:
        raise adapter_weights_changed(model_id) from exc
    filename = model_id.replace(":", "_").replace("/", "_") + ".zip"
    headers = {
        ARCHIVE_SHA256_HEADER: archive.sha256,  # of the body: what the client received
        WEIGHTS_SHA256_HEADER: stored.sha256,  # of adapter_model.safetensors inside
        "Content-Length": str(archive.size),
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    body = archive.body
    return StreamingResponse(
        iter(lambda: body.read(1 << 20), b""), media_type="application/zip", headers=headers
    )


@catalog.get("/{model_id:path}", response_model=ModelRead)
def retrieve_model(
    model_id: Id, org: OrgDep, session: ReadSessionDep, settings: SettingsDep
) -> ModelRead:
    target = registry.resolve_model(
        session, organization=org, model_id=model_id, base_models=settings.base_models
    )
    if target.adapter is None:
        base_models.require_loadable(settings.base_models, model_id)
        return base_model_view(model_id)
    if ":ckpt-step-" in model_id:
        row = registry.get_checkpoint(session, organization=org, model_id=model_id)
        return checkpoint_model_view(row, org.name, target.base_model)
    return adapter_view(
        registry.get_adapter(session, organization=org, model_id=model_id), org.name
    )


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(
    model_id: Id,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> ModelDeleted:
    """A fine-tuned model with all its checkpoints, or one checkpoint of an ended job."""
    if model_id in settings.base_models:
        raise InvalidRequest(
            "base models cannot be deleted; only fine-tuned adapters", param="model"
        )
    removed = registry.delete_model(session, organization=org, model_id=model_id)
    commit(session)  # no row names them any more: now nothing can load them again
    engine: InferenceEngine | None = getattr(request.app.state, "engine", None)
    if engine is not None:
        for gone in removed.model_ids:
            engine.unload_adapter(gone)  # returns once no scheduler holds it
    for key in removed.storage_keys:
        store.delete(key)
    return ModelDeleted(id=model_id, deleted_checkpoints=removed.checkpoints)
