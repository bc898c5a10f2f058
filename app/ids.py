"""Server-made ids. Storage paths are built only from these, never from user names."""

from __future__ import annotations

import re
import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
SAFE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def new_id(prefix: str, length: int = 24) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_secret() -> str:
    return "lf-" + secrets.token_urlsafe(32)
