"""Request bodies: size caps and a minimum pace, enforced while the body arrives.

- `/v1/files` (multipart) is refused from its Content-Length when that is already past the
  upload cap; otherwise it is capped while it streams (`app/api/multipart.py`).
- Every other body (JSON) is read here, before routing, and refused with 413 as soon as its
  running byte count passes `max_request_bytes`: a 10 MB prompt never reaches the JSON parser.
- Every body must keep arriving: the wait for each piece ends at
  `min(now + idle, start + idle + received / min_rate)`. A client that stalls or trickles is
  answered 408 and its connection closed, instead of holding a task for as long as it likes.

No database session is open while a body arrives (authentication closes its own), so slow
clients cost a coroutine each, never a pooled connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import LoraforgeError, PayloadTooLarge, RequestTimeout

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and form fields around the file part


@dataclass(frozen=True)
class BodyLimits:
    max_upload_bytes: int
    max_request_bytes: int  # JSON bodies; 0 disables
    idle_seconds: float  # longest wait for the next piece; 0 disables the pace checks
    min_bytes_per_second: float  # after the first idle_seconds; 0 disables


class _Pace:
    """When the next piece of a body must have arrived."""

    def __init__(self, limits: BodyLimits) -> None:
        self.limits, self.start, self.received = limits, time.monotonic(), 0

    def wait_seconds(self) -> float:
        idle, rate = self.limits.idle_seconds, self.limits.min_bytes_per_second
        if idle <= 0:
            return float("inf")
        if rate <= 0:
            return idle
        floor = self.start + idle + self.received / rate  # the minimum rate's deadline
        return max(0.0, min(idle, floor - time.monotonic()))


def paced(receive: Receive, limits: BodyLimits) -> Receive:
    """`receive`, raising RequestTimeout when the body does not keep its pace.

    Only body pieces are timed: once the body is complete, later calls (a streaming
    response listening for the client's disconnect) wait as long as they need.
    """
    pace, complete = _Pace(limits), False

    async def receive_paced() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            with anyio.fail_after(pace.wait_seconds()):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(
                "the request body arrived too slowly; send it at a steady pace"
            ) from None
        pace.received += len(message.get("body", b""))
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_paced


class RequestBodyLimits:
    """ASGI middleware applying `BodyLimits` to every HTTP request."""

    def __init__(self, app: ASGIApp, *, limits: BodyLimits, upload_path: str = "/v1/files"):
        self.app, self.limits, self.upload_path = app, limits, upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = paced(receive, self.limits)
        length = dict(scope["headers"]).get(b"content-length", b"")
        declared = int(length) if length.isdigit() else None
        try:
            if scope["method"] == "POST" and scope["path"] == self.upload_path:
                cap = self.limits.max_upload_bytes
                if declared is not None and declared > cap + MULTIPART_OVERHEAD:
                    raise PayloadTooLarge(f"file is larger than the {cap}-byte limit", param="file")
                # the route streams the rest and caps it exactly (app/api/multipart.py)
            else:
                receive = await self._buffered(receive, declared)
        except LoraforgeError as exc:
            await error_response(exc, close=True)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _buffered(self, receive: Receive, declared: int | None) -> Receive:
        """Read the whole (capped) body now; the app then receives it in one piece."""
        cap, size, chunks = self.limits.max_request_bytes, 0, []
        too_large = PayloadTooLarge(
            f"the request body is larger than the {cap}-byte limit", code="request_too_large"
        )
        if cap and declared is not None and declared > cap:
            raise too_large  # before reading any of it
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: pass that on
                return _replay(message, receive)
            size += len(message.get("body", b""))
            if cap and size > cap:
                raise too_large
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = b"".join(chunks)
                return _replay({"type": "http.request", "body": body, "more_body": False}, receive)


def _replay(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
