"""Server-made ids. Storage paths are built only from these, never from user names."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
MAX_ID_LENGTH = 255  # the widest id column (adapter and model names)


def new_id(prefix: str, length: int = 24, *, sep: str = "-") -> str:
    return f"{prefix}{sep}" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_secret() -> str:
    return "lf-" + secrets.token_urlsafe(32)


def check_id(value: str) -> str:
    """An id a client sends (path, query or body): 1-255 printable characters.

    The one gate for every incoming id, so that no NUL (PostgreSQL refuses it in text),
    control character or lone surrogate ever reaches a query; a refused id answers 400
    naming its field, like any other bad value.
    """
    if not 1 <= len(value) <= MAX_ID_LENGTH or not value.isprintable():
        raise ValueError(
            f"an id is 1-{MAX_ID_LENGTH} printable characters (no NUL, control "
            "characters or unpaired surrogates)"
        )
    return value


def check_text(value: str) -> str:
    """User text (prompts, messages, names): any Unicode but NUL and unpaired surrogates.

    A lone surrogate (JSON allows `\\ud800`) cannot be encoded as UTF-8, so tokenizers and
    PostgreSQL fail on it; NUL is refused by PostgreSQL text and never meaningful here.
    """
    if "\x00" in value:
        raise ValueError("text must not contain NUL (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "text must not contain unpaired UTF-16 surrogates (\\ud800-\\udfff)"
        ) from None
    return value
