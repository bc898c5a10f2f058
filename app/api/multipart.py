"""Streaming multipart parser for uploads: the size cap holds while the body arrives.

Starlette's form parser spools a whole upload to a temp file before the route runs
(Starlette #579), so a cap checked in the route comes too late. Here the body is read
from `request.stream()` chunk by chunk, the file part goes straight to our spool with a
running byte count, and the upload is refused (413) as soon as it passes the cap: at
most one network chunk past it is ever received, and nothing past the cap is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from app.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:  # python-multipart declares its callback TypedDict for type checkers only
    from python_multipart.multipart import MultipartCallbacks

FIELD_LIMIT = 16 * 1024  # bytes of all the small form fields together
MAX_PARTS = 16

# The request body as the OpenAPI schema shows it (the route reads the stream itself).
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


@dataclass
class Upload:
    """A received upload: the file part is on disk at `path`."""

    path: Path
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    """python-multipart callbacks: file part → spool (capped), other parts → small fields."""

    def __init__(self, spool: IO[bytes], upload: Upload, max_bytes: int) -> None:
        self.spool, self.upload, self.max_bytes = spool, upload, max_bytes
        self.digest = hashlib.sha256()
        self.header_field, self.header_value = b"", b""
        self.disposition: dict[bytes, bytes] = {}
        self.value, self.field_bytes, self.parts, self.files = bytearray(), 0, 0, 0

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"too many form parts (at most {MAX_PARTS})", param="file")
        self.disposition, self.value = {}, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = parse_options_header(self.header_value)[1]
        self.header_field, self.header_value = b"", b""

    def _is_file(self) -> bool:
        return self.disposition.get(b"name") == b"file"

    def on_headers_finished(self) -> None:
        if self._is_file():
            self.files += 1
            if self.files > 1:
                raise InvalidRequest("send exactly one 'file' part", param="file")
            name = self.disposition.get(b"filename")
            self.upload.filename = name.decode("utf-8", "replace") if name is not None else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file():
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"file is larger than the {self.max_bytes}-byte limit", param="file"
                )
            self.digest.update(chunk)
            self.spool.write(chunk)
            return
        self.field_bytes += len(chunk)
        if self.field_bytes > FIELD_LIMIT:
            raise InvalidRequest("form fields are too large", param="purpose")
        self.value += chunk

    def on_part_end(self) -> None:
        name = self.disposition.get(b"name")
        if name is not None and not self._is_file():
            self.upload.fields[name.decode("utf-8", "replace")] = self.value.decode(
                "utf-8", "replace"
            )


async def receive_upload(request: Request, spool: Path, *, max_bytes: int) -> Upload:
    """Parse the multipart body into `spool` (the 'file' part) and small fields."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("send the upload as multipart/form-data", param="file")
    upload = Upload(path=spool)
    with open(spool, "wb") as out:
        receiver = _Receiver(out, upload, max_bytes)
        parser = MultipartParser(boundary, _callbacks(receiver))
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"malformed multipart body: {exc}", param="file") from None
    if receiver.files == 0:
        raise InvalidRequest("Missing required parameter: file", param="file")
    upload.sha256 = receiver.digest.hexdigest()
    return upload


def _callbacks(receiver: _Receiver) -> MultipartCallbacks:
    return {
        "on_part_begin": receiver.on_part_begin,
        "on_part_data": receiver.on_part_data,
        "on_part_end": receiver.on_part_end,
        "on_header_field": receiver.on_header_field,
        "on_header_value": receiver.on_header_value,
        "on_header_end": receiver.on_header_end,
        "on_headers_finished": receiver.on_headers_finished,
    }
