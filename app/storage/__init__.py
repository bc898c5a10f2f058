"""The artifact store: datasets, result files, checkpoints and adapters, by key.

`open_store(settings)` picks the backend from `LORAFORGE_STORAGE_URL`: unset or `file://`
for a local directory (`LocalStore`), `s3://bucket/prefix` for S3-compatible object storage
(`S3Store`). The rules every backend keeps are in app/storage/base.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from app.storage.base import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    FileEntry,
    Manifest,
    copy_checked,
    file_sha256,
)
from app.storage.local import LocalStore

if TYPE_CHECKING:
    from app.config import Settings

__all__ = [
    "ArtifactCorrupt",
    "ArtifactMissing",
    "ArtifactStore",
    "FileEntry",
    "LocalStore",
    "Manifest",
    "copy_checked",
    "file_sha256",
    "open_store",
]


def open_store(settings: Settings) -> ArtifactStore:
    """The store `settings` name; scratch stays on this host, under the data dir."""
    url = settings.storage_url
    if url is None:
        return LocalStore(settings.artifacts_dir)
    if url.startswith("s3://"):
        from app.storage.s3 import S3Store

        return S3Store(url, scratch=settings.artifacts_dir / "tmp")
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc in {"", "localhost"}:
        return LocalStore(Path(unquote(parsed.path)))
    raise ValueError(
        f"LORAFORGE_STORAGE_URL must be file:///abs/path or s3://bucket[/prefix]; got {url!r}"
    )
