"""The downloadable form of a stored adapter: a deterministic zip that loads anywhere,
streamed from the artifact store (local or object store) into the zip.

The zip holds PEFT's two files. Its bytes depend only on the stored files and the base
model's public name (fixed timestamps and attributes, stored uncompressed), so the sha256
of a download is stable and a client can check what it received against the header.
`adapter_config.json` names the base by its public name (the allowlist name, or the hub id
where the allowlist points at the hub), never the server's local path; the stored copy
keeps the local path the server loads from.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import IO

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazy export

from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from app.storage import ArtifactCorrupt, ArtifactMissing, ArtifactStore

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: no build time leaks in
_UNIX, _FILE_0644 = 3, 0o100644 << 16
# The download's headers: the sha256 of the body (the zip as sent) and of the weights inside.
ARCHIVE_SHA256_HEADER = "X-Adapter-SHA256"
WEIGHTS_SHA256_HEADER = "X-Adapter-Weights-SHA256"
_CHUNK = 1 << 20


@dataclass
class Archive:
    body: IO[bytes]  # positioned at the start
    sha256: str  # of exactly the bytes of `body`
    size: int


def public_base_name(name: str, ref: str | None) -> str:
    """What a downloaded adapter names as its base: the hub id when the allowlist entry
    `name=ref` is one (what transformers would fetch: not a local directory, a valid repo
    id), otherwise the allowlist name."""
    if ref is None or Path(ref).expanduser().is_dir():
        return name
    try:
        validate_repo_id(ref)
    except HFValidationError:  # a local path (missing here): never sent to clients
        return name
    return ref


def adapter_archive(
    store: ArtifactStore, key: str, *, base_model: str, weights_sha256: str
) -> Archive:
    """The zip of the adapter published at `key`, its config naming `base_model`.

    The weights stream from the store into the zip a chunk at a time, hashed on the way:
    bytes that are not the recorded `weights_sha256` are refused (`ArtifactCorrupt`) and
    nothing is sent. `ArtifactMissing` when the adapter is not published.
    """
    manifest = store.manifest(key)
    weights = manifest.files.get(ADAPTER_WEIGHTS) if manifest else None
    if weights is None:  # none, or only a pickled .bin: refused like a corrupt file
        raise ArtifactMissing(f"{key} holds no {ADAPTER_WEIGHTS}")
    with store.open(f"{key}/{ADAPTER_CONFIG}") as src:
        config = json.loads(src.read())
    config["base_model_name_or_path"] = base_model
    body = SpooledTemporaryFile(max_size=64 << 20)
    digest = hashlib.sha256()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr(_entry(ADAPTER_CONFIG), json.dumps(config, indent=2, sort_keys=True))
        entry = _entry(ADAPTER_WEIGHTS)
        entry.file_size = weights.size  # decides zip64 up front, as a size must
        with store.open(f"{key}/{ADAPTER_WEIGHTS}") as src, bundle.open(entry, "w") as dest:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dest.write(chunk)
    if digest.hexdigest() != weights_sha256.strip().lower():
        body.close()
        raise ArtifactCorrupt(f"{key}/{ADAPTER_WEIGHTS} does not match its recorded sha256")
    size = body.tell()
    body.seek(0)
    digest = hashlib.sha256()
    while chunk := body.read(_CHUNK):
        digest.update(chunk)
    body.seek(0)
    return Archive(body=body, sha256=digest.hexdigest(), size=size)


def _entry(name: str) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    entry.compress_type = zipfile.ZIP_STORED
    entry.create_system, entry.external_attr = _UNIX, _FILE_0644
    return entry
