"""What other threads send a base model's scheduler thread (`scheduler.py`), one class each.

The scheduler takes them from its inbox between forward passes and dispatches on the type.
`done` events are set once the scheduler has acted, for callers that wait on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.inference.types import AdapterRef

if TYPE_CHECKING:
    from app.inference.adapter_files import AdapterWeights
    from app.inference.request import Request


@dataclass(frozen=True)
class Submit:
    """A tokenized request to run (from a request thread)."""

    request: Request


@dataclass(frozen=True)
class Loaded:
    """The loader thread read `ref`: its weights, or the error that stopped the read."""

    ref: AdapterRef
    result: AdapterWeights | Exception
    seconds: float


@dataclass(frozen=True)
class Preload:
    """Load `ref` and pin it; `done` is set once it is resident or has failed."""

    ref: AdapterRef
    done: threading.Event


@dataclass(frozen=True)
class Unload:
    """`adapter_id` was deleted: refuse its waiting requests, evict it once no row uses it."""

    adapter_id: str
    done: threading.Event


@dataclass(frozen=True)
class Stop:
    """End the scheduler thread."""


Message = Submit | Loaded | Preload | Unload | Stop
