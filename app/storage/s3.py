"""The artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph, R2, …).

Through s3fs (fsspec's S3 filesystem over aiobotocore): a well-kept client that does
multipart uploads, retries and the standard AWS configuration (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles, instance roles), so
nothing loraforge-specific is needed to point it at MinIO.

One object's PUT (or a multipart upload's completion) is atomic, so a file is published by
uploading it. A directory is several objects, published manifest-last (app/storage/base.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from app.storage.base import (
    CHUNK,
    ArtifactMissing,
    ArtifactStore,
    FileEntry,
    Manifest,
    check_key,
    file_sha256,
)


class S3Store(ArtifactStore):
    def __init__(self, url: str, scratch: Path):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"LORAFORGE_STORAGE_URL names no bucket: {url!r}")
        self.base = "/".join(p for p in (bucket, prefix.strip("/")) if p)
        super().__init__(scratch)

    @property
    def fs(self) -> Any:
        import s3fs

        region = os.environ.get("AWS_REGION")
        # fsspec caches one filesystem per arguments and process (cleared after a fork).
        # Listings are never cached: another host may publish or delete at any moment.
        return s3fs.S3FileSystem(
            use_listings_cache=False,
            client_kwargs={"region_name": region} if region else {},
        )

    def _path(self, key: str) -> str:
        return f"{self.base}/{check_key(key)}"

    def put(self, local: Path, path: str) -> None:
        """Upload one file: past two parts of CHUNK bytes it goes multipart, read a part at
        a time (never the whole file in memory); the object appears once complete."""
        self.fs.put_file(str(local), path, chunksize=CHUNK)

    def publish_file(self, src: Path, key: str) -> None:
        self.put(src, self._path(key))
        src.unlink(missing_ok=True)

    def publish_dir(self, src: Path, key: str) -> Manifest:
        """Hide what `key` held (its manifest first), upload every file, then the manifest."""
        self.delete(key)
        files = {}
        for item in sorted(p for p in src.iterdir() if p.is_file()):
            files[item.name] = FileEntry(item.stat().st_size, file_sha256(item))
            self.put(item, f"{self._path(key)}/{item.name}")
        manifest = Manifest(files)
        self.fs.pipe_file(f"{self._path(key)}/{Manifest.NAME}", manifest.to_bytes())
        return manifest

    def delete(self, key: str) -> None:
        path = self._path(key)
        manifest = f"{path}/{Manifest.NAME}"
        if self._is_file(manifest):  # first: from here on no reader trusts the rest
            self.fs.rm(manifest)
        found = self.fs.find(path)  # a file itself, or everything under the prefix
        if found:
            self.fs.rm(found)

    def manifest(self, key: str) -> Manifest | None:
        try:
            return Manifest.from_bytes(self.fs.cat_file(f"{self._path(key)}/{Manifest.NAME}"))
        except FileNotFoundError:
            return None

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        try:
            handle = self.fs.open(self._path(key), "rb", block_size=CHUNK)
        except FileNotFoundError as exc:
            raise ArtifactMissing(f"{key} is not stored") from exc
        with handle:
            yield handle

    def exists(self, key: str) -> bool:
        return self._is_file(self._path(key))

    def _is_file(self, path: str) -> bool:
        return bool(self.fs.isfile(path))

    def entries(self, folder: str) -> list[tuple[str, float]]:
        """Each child of `folder` with its newest object's time (a prefix has no time of
        its own; a half-uploaded directory is as old as its last object)."""
        prefix = self._path(folder) + "/"
        newest: dict[str, float] = {}
        for path, info in self.fs.find(prefix, detail=True).items():
            child = path.removeprefix(prefix).split("/", 1)[0]
            mtime = info["LastModified"].timestamp()
            newest[child] = max(mtime, newest.get(child, mtime))
        return [(f"{folder}/{child}", mtime) for child, mtime in sorted(newest.items())]
