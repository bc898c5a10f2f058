"""The engine's value types: what the API layer passes in and gets back. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: its public id, its directory, its weights' sha256, its owner.

    `path` holds `adapter_config.json` + `adapter_model.safetensors`; `sha256` is the
    hex digest of `adapter_model.safetensors` recorded when the adapter was published.
    `owner` (an organization id) only scopes what the visibility endpoint shows.
    """

    id: str
    path: Path
    sha256: str
    owner: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely ones."""

    token: str
    logprob: float
    top: dict[str, float]
    offset: int  # where the token's text starts in the completion text


@dataclass
class Delta:
    """A piece of a streamed completion: new text (held back while it may start a stop
    string), the logprobs of the tokens that produced it, and the finish reason at the end."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def followed_by(self, later: Delta) -> Delta:
        """This piece and the next as one (the text and logprobs of both, in order)."""
        return Delta(
            self.text + later.text,
            self.logprobs + later.logprobs,
            later.finish_reason or self.finish_reason,
        )


@dataclass
class Generation:
    """One completion.

    `text` excludes the prompt, the EOS token and anything from a matched stop string on.
    `completion_tokens` counts every token the model generated, including a final EOS
    and the tokens that spelled a matched stop string (what the model actually ran).
    `logprobs` (when asked for) covers every generated token but a final EOS.
    """

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class AdapterStats:
    """What the visibility endpoint shows for one adapter (kept after eviction)."""

    id: str
    base_model: str
    owner: str | None
    loaded: bool = False
    pinned: bool = False
    rank: int | None = None
    bytes: int = 0
    hits: int = 0  # requests that found it resident
    misses: int = 0  # requests that had to wait for a load
    loads: int = 0
    evictions: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: float | None = None  # unix time of the last request
    last_load_seconds: float | None = None
