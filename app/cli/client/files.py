"""`loraforge files …`: upload (with a progress bar for large files), list, delete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.cli.client.connection import DEFAULT_BASE_URL, Api, ApiKey, AsJson, BaseUrl, connect
from app.cli.client.output import print_json, print_table, stderr_console, when
from app.schemas.common import Deleted, ListPage
from app.schemas.files import FileRead

files_cli = typer.Typer(help="Training files (JSONL).", no_args_is_help=True)
LARGE_FILE_BYTES = 1 << 20  # a progress bar from this size up


class _Counted:
    """A file whose reads advance a progress bar (httpx reads the multipart part by chunks)."""

    def __init__(self, file: BinaryIO, progress: Progress, task: TaskID):
        self.file, self.progress, self.task = file, progress, task

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        self.progress.advance(self.task, len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.file.seek(offset, whence)
        self.progress.update(self.task, completed=position)
        return position

    def tell(self) -> int:
        return self.file.tell()

    def fileno(self) -> int:
        return self.file.fileno()


def upload_file(api: Api, path: Path, *, purpose: str = "fine-tune", quiet: bool = False) -> Any:
    """POST /v1/files; the file object as the server sent it."""
    size = path.stat().st_size
    with path.open("rb") as file:
        if quiet or size < LARGE_FILE_BYTES:
            return api.call(
                "POST", "/files", files={"file": (path.name, file)}, data={"purpose": purpose}
            )
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(
            f"uploading {path.name}", *columns, console=stderr_console(), transient=True
        ) as progress:
            counted = _Counted(file, progress, progress.add_task("upload", total=size))
            return api.call(
                "POST", "/files", files={"file": (path.name, counted)}, data={"purpose": purpose}
            )


@files_cli.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    purpose: str = "fine-tune",
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a JSONL dataset; prints its id (a bad line is named by the server)."""
    with connect(base_url, api_key) as api:
        body = upload_file(api, path, purpose=purpose, quiet=as_json)
    if as_json:
        print_json(body)
    else:
        uploaded = FileRead.model_validate(body)
        typer.echo(f"{uploaded.id}\t{uploaded.bytes} bytes\t{uploaded.filename}")


@files_cli.command("list")
def list_files(
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """This organization's files."""
    with connect(base_url, api_key) as api:
        body = api.call("GET", "/files")
    if as_json:
        return print_json(body)
    rows = [
        [row.id, row.filename, str(row.bytes), row.purpose, when(row.created_at)]
        for row in ListPage[FileRead].model_validate(body).data
    ]
    print_table(["id", "filename", "bytes", "purpose", "created"], rows)


@files_cli.command("delete")
def delete(
    file_id: str,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Delete a file (refused while a queued or running job reads it)."""
    with connect(base_url, api_key) as api:
        body = api.call("DELETE", f"/files/{file_id}")
    if as_json:
        return print_json(body)
    typer.echo(f"deleted {Deleted.model_validate(body).id}")
