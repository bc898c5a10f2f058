from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import FileResponse

from app import files
from app.api.deps import OrgDep, SessionDep, SettingsDep, StoreDep
from app.api.views import file_view
from app.db.session import commit
from app.schemas.common import Deleted, ListPage
from app.schemas.files import FileRead

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileRead)
def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form()],
    org: OrgDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> FileRead:
    row = files.create_file(
        session,
        organization=org,
        upload=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        store=store,
        max_bytes=settings.max_upload_bytes,
        max_lines=settings.max_lines_per_file,
    )
    commit(session)
    return file_view(row)


@router.get("", response_model=ListPage[FileRead])
def list_files(org: OrgDep, session: SessionDep) -> ListPage[FileRead]:
    return ListPage(data=[file_view(row) for row in files.list_files(session, organization=org)])


@router.get("/{file_id}", response_model=FileRead)
def retrieve_file(file_id: str, org: OrgDep, session: SessionDep) -> FileRead:
    return file_view(files.get_file(session, organization=org, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, org: OrgDep, session: SessionDep, store: StoreDep) -> FileResponse:
    row = files.get_file(session, organization=org, file_id=file_id)
    return FileResponse(store.path(row.storage_key), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: str, org: OrgDep, session: SessionDep, store: StoreDep) -> Deleted:
    files.delete_file(session, organization=org, file_id=file_id, store=store)
    return Deleted(id=file_id, object="file")
