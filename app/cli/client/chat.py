"""`loraforge chat --model M ["prompt"]`: one answer, or a conversation, streamed as it comes."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from app.cli.client.connection import DEFAULT_BASE_URL, Api, ApiKey, AsJson, BaseUrl, connect, fail
from app.cli.client.output import print_json
from app.schemas.inference import ChatCompletionChunk, ChatCompletionResponse

QUIT = {"/exit", "/quit"}
MAX_TURNS = 1000  # a conversation is bounded like every loop here


def chat(
    model: Annotated[str, typer.Option(help="A base model, adapter or checkpoint id.")],
    prompt: Annotated[
        str | None, typer.Argument(help="Ask once and print the answer (else: a conversation).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    temperature: float = 0.7,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens per answer.")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Chat with a model, streaming; with PROMPT, one answer. --json: the completion object(s)
    (not streamed)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    settings: dict[str, Any] = {"model": model, "temperature": temperature}
    if max_tokens is not None:
        settings["max_tokens"] = max_tokens
    with connect(base_url, api_key) as api:
        if prompt is not None:
            _turn(api, settings, [*messages, {"role": "user", "content": prompt}], as_json)
            return
        if not as_json:
            typer.echo(f"chatting with {model}; /exit or Ctrl-D ends", err=True)
        for _ in range(MAX_TURNS):
            try:
                line = input("> " if not as_json else "")
            except EOFError:
                break
            if line.strip() in QUIT:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            messages.append(
                {"role": "assistant", "content": _turn(api, settings, messages, as_json)}
            )


def _turn(api: Api, settings: dict[str, Any], messages: list[dict[str, str]], as_json: bool) -> str:
    """Ask with `messages`; print the answer (streamed, or the object with --json); its text."""
    body = settings | {"messages": messages}
    if as_json:
        answer = api.call("POST", "/chat/completions", json=body)
        print_json(answer)
        return ChatCompletionResponse.model_validate(answer).choices[0].message.content or ""
    text = []
    for _, _, data in api.server_sent("POST", "/chat/completions", json=body | {"stream": True}):
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:  # a failure after the stream started, in OpenAI's envelope
            typer.echo("")
            raise fail(chunk["error"].get("message", "the stream failed"))
        for choice in ChatCompletionChunk.model_validate(chunk).choices:
            if choice.delta.content:
                text.append(choice.delta.content)
                typer.echo(choice.delta.content, nl=False)
    typer.echo("")
    return "".join(text)
