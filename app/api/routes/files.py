from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api import idempotency
from app.api.deps import OrgDep, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from app.api.idempotency import IdempotencyHeader
from app.api.multipart import UPLOAD_OPENAPI, Upload, receive_upload
from app.api.views import file_view
from app.config import Settings
from app.db.models import Organization
from app.db.session import commit, session_scope
from app.files import service as files
from app.schemas.common import Deleted, Id, ListPage
from app.schemas.files import FileRead
from app.storage import ArtifactStore
from app.storage.base import CHUNK

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileRead, openapi_extra=UPLOAD_OPENAPI)
async def upload_file(
    request: Request,
    org: OrgDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> FileRead:
    """Stream the body into a capped spool (413 past the cap), then validate and store.

    The database session opens only once the whole body is here (`_store`): a client that
    sends slowly holds no connection (and is dropped by app/api/limits.py).
    """
    idempotency.check_key(idempotency_key)
    with store.temp_dir() as tmp:
        upload = await receive_upload(
            request, tmp / "upload.jsonl", max_bytes=settings.max_upload_bytes
        )
        return await run_in_threadpool(_store, upload, org, store, settings, idempotency_key)


def _store(
    upload: Upload, org: Organization, store: ArtifactStore, settings: Settings, key: str | None
) -> FileRead:
    """Replay, or validate and store then commit the row: the bytes travel to the store
    between two short sessions, never while one is open (an object store is network)."""
    filename, purpose = upload.filename or "upload.jsonl", upload.fields.get("purpose")
    files.check_upload(filename=filename, purpose=purpose)
    digest = idempotency.request_sha256(upload.sha256, filename, purpose or "")
    scope = idempotency.Scope(organization=org, endpoint="files", key=key, digest=digest)
    with session_scope(settings.sqlalchemy_url) as session:
        earlier = idempotency.replayed_id(session, **scope)
        if earlier is not None:
            return _file(session, org, earlier)
    staged = files.stage_upload(
        spool=upload.path, size=upload.size, sha256=upload.sha256, filename=filename,
        purpose=purpose or "", store=store, max_lines=settings.max_lines_per_file,
        max_line_bytes=settings.max_line_bytes,
    )  # fmt: skip
    kept = False
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            files.add_file_row(
                session, organization=org, staged=staged,
                max_stored_bytes=settings.max_stored_bytes_per_org,
            )  # fmt: skip
            # a concurrent request with the same key may have won: then its file is answered
            winner = idempotency.commit_once(session, **scope, object_id=staged.file_id)
            kept = winner == staged.file_id
            return _file(session, org, winner)
    finally:
        if not kept:  # refused, lost the key's race, or failed: nothing half-stored
            store.delete(staged.storage_key)


def _file(session: Session, org: Organization, file_id: str) -> FileRead:
    fetch = lambda file_id: files.get_file(session, organization=org, file_id=file_id)  # noqa: E731
    return file_view(idempotency.current(fetch, file_id, kind="file"))


@router.get("", response_model=ListPage[FileRead])
def list_files(org: OrgDep, session: ReadSessionDep) -> ListPage[FileRead]:
    return ListPage(data=[file_view(row) for row in files.list_files(session, organization=org)])


@router.get("/{file_id}", response_model=FileRead)
def retrieve_file(file_id: Id, org: OrgDep, session: ReadSessionDep) -> FileRead:
    return file_view(files.get_file(session, organization=org, file_id=file_id))


# What a stored file is, by its key: uploads are JSONL, a job's metrics result file is CSV.
CONTENT_TYPES = {".jsonl": "application/jsonl", ".csv": "text/csv"}


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {kind: {} for kind in CONTENT_TYPES.values()}}},
)
def file_content(
    file_id: Id, org: OrgDep, session: ReadSessionDep, store: StoreDep
) -> StreamingResponse:
    """The stored bytes, streamed from the store a chunk at a time (local or object store)."""
    row = files.get_file(session, organization=org, file_id=file_id)
    key = row.storage_key
    suffix = "." + key.rsplit(".", 1)[-1]

    def chunks() -> Iterator[bytes]:
        with store.open(key) as src:
            while chunk := src.read(CHUNK):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type=CONTENT_TYPES.get(suffix, "application/jsonl"),
        headers={"Content-Length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: Id, org: OrgDep, session: SessionDep, store: StoreDep) -> Deleted:
    storage_key = files.delete_file(session, organization=org, file_id=file_id)
    commit(session)  # the row is gone for good: only now may its bytes go
    store.delete(storage_key)
    return Deleted(id=file_id, object="file")
