"""The base-model allowlist (`LORAFORGE_BASE_MODELS`): which entries can load, and why not.

Each entry maps a public name to a reference: a local directory or a hub id. A reference
that looks like a path is a path (it starts with `/`, `.` or `~`, or has more separators
than a hub id's `org/name`), and a path is never handed to the hub: a typo is reported as
the missing directory it is, not turned into a download that retries for half a minute.
A hub id (or an `org/name` that is not a local directory) loads when the hub cache holds it,
or when the hub answers and lets us read it: not with `HF_HUB_OFFLINE` set, and a gated or
private repository needs `HF_TOKEN`.

Every process checks its allowlist when it starts (`report`) and logs each entry that
cannot load. Such a base stays configured but unusable: `/v1/models` leaves it out, a job
naming it is refused (400) and a request for it answers 503 at once, each naming the
model and the reason. Local entries are checked again on each use (a stat; fixing the
directory needs no restart); a hub entry's answer is kept for the life of the process.
Torch-free: the API checks without loading anything.

An entry may carry options after its reference, separated by `;`:
`tiny=/models/tiny;quantization=nf4` serves that base quantized by bitsandbytes (`nf4` or
`int8`; `none` is the default). The options only change how the engine loads the base: jobs
choose their own quantization (`hyperparameters.quantization`), and any adapter is served on
any precision of its base.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from app.errors import LoraforgeError, ServiceUnavailable

logger = logging.getLogger(__name__)

HUB_TIMEOUT_SECONDS = 10.0  # one metadata request per uncached hub entry, at start
SETTING = "LORAFORGE_BASE_MODELS"
OPTION_SEPARATOR = ";"  # name=ref;quantization=nf4
OPTIONS = ("quantization",)


class BaseModelUnavailable(ServiceUnavailable):
    """An allowlisted base model that cannot be loaded on this machine (503 for requests)."""

    code = "model_not_available"


def split_options(entries: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """({name: reference}, {name: serving quantization}) of allowlist values that may carry
    `;key=value` options; an unknown option or value raises ValueError naming the entry."""
    from app.quantization import parse

    refs: dict[str, str] = {}
    quantized: dict[str, str] = {}
    for name, value in entries.items():
        ref, *options = (part.strip() for part in value.split(OPTION_SEPARATOR))
        refs[name] = ref
        for option in options:
            key, sep, chosen = (part.strip() for part in option.partition("="))
            where = f"{SETTING} entry {name}"
            if not sep or key not in OPTIONS:
                raise ValueError(
                    f"{where}: unknown option {option!r} (known: {', '.join(OPTIONS)})"
                )
            if parse(chosen, where=where) != "none":
                quantized[name] = chosen
    return refs, quantized


def looks_like_path(ref: str) -> bool:
    """A local path by its spelling: never looked up on the hub, whether it exists or not."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref


def problem(ref: str) -> str | None:
    """Why `ref` cannot be loaded here, or None when it can."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"the directory {path.resolve()} has no config.json (not a transformers model)"
        return None
    if looks_like_path(ref):
        return f"it is a local path and {path.resolve()} is not a directory"
    return _hub_problem(ref)


def unavailable(base_models: dict[str, str]) -> dict[str, str]:
    """{name: reason} for every allowlist entry that cannot be loaded."""
    reasons = {name: problem(ref) for name, ref in base_models.items()}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def usable(base_models: dict[str, str]) -> dict[str, str]:
    """The entries that can be loaded (what `/v1/models` lists)."""
    bad = unavailable(base_models)
    return {name: ref for name, ref in base_models.items() if name not in bad}


def explain(name: str, ref: str, reason: str) -> str:
    return (
        f"base model {name!r} cannot be loaded: {reason}; fix its {SETTING} entry "
        f"{name}={ref} on the server"
    )


def require_loadable(
    base_models: dict[str, str], name: str, *, error: type[LoraforgeError] = BaseModelUnavailable
) -> None:
    """Raise `error` (503 by default; job creation passes InvalidRequest) naming the reason."""
    ref = base_models.get(name)
    reason = problem(ref) if ref is not None else None
    if ref is not None and reason is not None:
        raise error(explain(name, ref, reason), param="model", code="model_not_available")


def checked_ref(ref: str) -> str:
    """`ref` for the loaders; a path that is not a directory raises instead of reaching the hub."""
    if looks_like_path(ref) and not Path(ref).expanduser().is_dir():
        raise BaseModelUnavailable(
            f"base model path {ref!r} cannot be loaded: {problem(ref)}", code="model_not_available"
        )
    return str(Path(ref).expanduser()) if ref.startswith("~") else ref


def report(base_models: dict[str, str]) -> dict[str, str]:
    """Check every entry once, at start; log each one that cannot load. {name: reason}."""
    bad = unavailable(base_models)
    if not base_models:
        logger.warning("%s is empty: no job or request can name a base model", SETTING)
    for name, reason in bad.items():
        logger.error("%s", explain(name, base_models[name], reason))
    return bad


# -- the hub -----------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _hub_problem(ref: str) -> str | None:
    import httpx
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    local = f"no local directory {Path(ref).resolve()}"
    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return None  # in the hub cache: loads without the network
    except HFValidationError:
        return f"{local}, and {ref!r} is not a valid hub id"
    if constants.is_offline_mode():
        return (
            f"{local}, and the hub id {ref!r} is not in the hub cache ({constants.HF_HUB_CACHE}) "
            "while the hub is off (HF_HUB_OFFLINE): download it first or use a local directory"
        )
    try:
        model_info(ref, timeout=HUB_TIMEOUT_SECONDS)
    except GatedRepoError:
        return f"the hub repository {ref!r} is gated: accept its terms and set HF_TOKEN"
    except RepositoryNotFoundError:
        return f"{local}, and no hub repository {ref!r} (if it is private, set HF_TOKEN)"
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        return (
            f"{local}, the hub id {ref!r} is not in the hub cache and the hub cannot be reached "
            f"({type(exc).__name__}); download it first or use a local directory"
        )
    return None
