"""The client commands' one HTTP client: where the server is, the key, errors, SSE.

Responses are parsed with the API's own schemas (`app/schemas`), never a second copy of them;
`--json` prints the response body as the server sent it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer

DEFAULT_BASE_URL = "http://127.0.0.1:8000"  # where `loraforge up` serves
READ_TIMEOUT_SECONDS = 60.0  # longer than an event stream's ping interval (15 s)

BaseUrl = Annotated[
    str,
    typer.Option(
        "--base-url",
        envvar=["LORAFORGE_BASE_URL", "OPENAI_BASE_URL"],
        help="The server (with or without /v1). Else LORAFORGE_BASE_URL, else OPENAI_BASE_URL.",
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=["LORAFORGE_API_KEY", "OPENAI_API_KEY"],
        help="An API key. Else LORAFORGE_API_KEY, else OPENAI_API_KEY.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's object as is.")]


class ApiError(Exception):
    """An error answer, in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, body: dict[str, Any]):
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        self.status = status
        self.message = str(error.get("message") or body or f"HTTP {status}")
        self.param: str | None = error.get("param")
        self.code: str | None = error.get("code")
        super().__init__(self.message)

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500] or response.reason_phrase}}
        return cls(response.status_code, body if isinstance(body, dict) else {})


class Api:
    """The server's `/v1` API with a bearer key."""

    def __init__(self, base_url: str, api_key: str):
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.http = httpx.Client(
            base_url=f"{self.root}/v1",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(READ_TIMEOUT_SECONDS, connect=10.0),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful answer; an error answer raises `ApiError`."""
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise ApiError.of(response)
        return response.json()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        with self.http.stream(method, path, **kwargs) as response:
            if response.is_error:
                response.read()
                raise ApiError.of(response)
            yield response

    def server_sent(
        self, method: str, path: str, **kwargs: Any
    ) -> Iterator[tuple[str, str | None, str]]:
        """(event, id, data) of each Server-Sent Event the answer carries (pings skipped)."""
        with self.stream(method, path, **kwargs) as response:
            yield from parse_sse(response.iter_lines())

    def close(self) -> None:
        self.http.close()


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str | None, str]]:
    """SSE framing (the WHATWG rules the API's streams use): fields up to a blank line."""
    event, event_id, data = "message", None, list[str]()
    for line in lines:
        if line == "":
            if data:
                yield event, event_id, "\n".join(data)
            event, event_id, data = "message", None, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                event_id = value


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def connect(base_url: str, api_key: str | None) -> Iterator[Api]:
    """An `Api`; an error answer or an unreachable server ends the command (exit 1), saying
    what the server said (a dataset's error names its line)."""
    if not api_key:
        raise fail("no API key: give --api-key, or set LORAFORGE_API_KEY or OPENAI_API_KEY", 2)
    api = Api(base_url, api_key)
    try:
        yield api
    except ApiError as exc:
        where = f" (param: {exc.param})" if exc.param else ""
        raise fail(f"{exc.message}{where}") from None
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the server at {api.root}: {exc}") from None
    except ConnectionError as exc:  # a watch that lost the server for longer than it waits
        raise fail(f"{exc} at {api.root}") from None
    finally:
        api.close()
