"""The artifact store as a local directory (the embedded default; a shared volume in
docker compose). Every write goes to a temp path on the same filesystem and is renamed
into place, so the rename is the moment of publishing: readers never see half a file or
half a directory. Readers get the stored paths themselves (zero copy)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from app.storage.base import ArtifactMissing, ArtifactStore, FileEntry, Manifest


class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = root.resolve()
        super().__init__(self.root / "tmp")  # same filesystem as the store: publish = rename

    def path(self, key: str) -> Path:
        """The absolute path of `key`, refusing anything that escapes the root."""
        path = (self.root / key).resolve()
        if path == self.root or self.root not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def publish_file(self, src: Path, key: str) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)

    def publish_dir(self, src: Path, key: str) -> Manifest:
        """Copy `src` next to its destination, fsync, then rename it into place."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".staging-"))
        shutil.copytree(src, staging, dirs_exist_ok=True)
        for item in staging.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        return _listing(dest)

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def manifest(self, key: str) -> Manifest | None:
        path = self.path(key)
        return _listing(path) if path.is_dir() else None

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        try:
            handle = open(self.path(key), "rb")  # closed below
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ArtifactMissing(f"{key} is not stored") from exc
        with handle:
            yield handle

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def entries(self, folder: str) -> list[tuple[str, float]]:
        found = []
        try:
            children = list(self.path(folder).iterdir())
        except FileNotFoundError:
            return []
        for entry in children:
            try:
                found.append((f"{folder}/{entry.name}", entry.stat().st_mtime))
            except FileNotFoundError:  # removed since the listing
                continue
        return found

    def local_file(self, key: str, into: Path) -> Path:
        if not self.exists(key):
            raise ArtifactMissing(f"{key} is not stored")
        return self.path(key)  # renamed into place whole: no copy needed

    def local_dir(self, key: str, into: Path, names: Collection[str] | None = None) -> Path:
        path = self.path(key)
        if not path.is_dir():
            raise ArtifactMissing(f"{key} is not published")
        return path


def _listing(folder: Path) -> Manifest:
    """A published local directory's manifest: its files (the rename vouches for them)."""
    files = {p.name: FileEntry(p.stat().st_size, None) for p in folder.iterdir() if p.is_file()}
    return Manifest(files)
