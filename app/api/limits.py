"""Refuse an oversized upload from its Content-Length, before any of the body is read.

Uploads without a Content-Length (chunked) are capped while they stream
(`app/api/multipart.py`); this middleware only saves receiving a body we would refuse.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and form fields around the file part


class UploadSizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, path: str = "/v1/files"):
        self.app, self.max_bytes, self.path = app, max_bytes, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes + MULTIPART_OVERHEAD:
                await self._refuse(send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"file is larger than the {self.max_bytes}-byte limit",
                    "type": "invalid_request_error",
                    "param": "file",
                    "code": "file_too_large",
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
