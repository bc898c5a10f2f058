"""The artifact store's interface, its manifest and what every backend shares.

A store holds files by key (`datasets/<id>.jsonl`, `results/<id>.csv`) and published
directories (`adapters/<job>`, `checkpoints/<job>/step-<N>`). Keys are relative paths built
from server-made ids. Scratch (an attempt's working files, upload spools) is always on the
local disk of the host that uses it, never in the store: no host reads another's scratch.

Atomic publish: a directory is visible only once its manifest (each file's size and sha256)
exists. On the local backend the rename of a complete directory is that moment; on an
object store the manifest object is written last, after every file it names, and deleted
first. A reader trusts only the files a manifest names and checks each one's sha256 as it
reads it, so a crash between objects leaves garbage (removed by the sweep), never half an
adapter that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHUNK = 8 << 20  # bytes read, hashed and sent at a time; also the multipart part size


class ArtifactMissing(LookupError):
    """No such file, or a directory that was never published (no manifest)."""


class ArtifactCorrupt(ValueError):
    """A stored file does not match the size or sha256 its manifest records."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str | None  # None on the local backend, whose rename is the proof of completeness


@dataclass(frozen=True)
class Manifest:
    """What a published directory holds: file name → size and sha256."""

    files: dict[str, FileEntry]

    NAME = "store-manifest.json"  # written last into the directory's prefix (object stores)

    def to_bytes(self) -> bytes:
        files = {name: {"size": e.size, "sha256": e.sha256} for name, e in self.files.items()}
        return json.dumps({"format": 1, "files": files}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        files = json.loads(raw)["files"]
        return cls({name: FileEntry(int(e["size"]), e["sha256"]) for name, e in files.items()})


def check_key(key: str) -> str:
    """`key` if it is a relative path of plain names (no '..', no absolute path)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"storage key escapes the store: {key!r}")
    return key


class ArtifactStore(ABC):
    """One interface, two backends: `LocalStore` (a directory) and `S3Store` (S3 API)."""

    def __init__(self, scratch: Path):
        self.scratch = scratch  # this host's scratch root (`tmp/`), never shared
        self.scratch.mkdir(parents=True, exist_ok=True)

    # --- writing -------------------------------------------------------------------
    @abstractmethod
    def publish_file(self, src: Path, key: str) -> None:
        """Store the file `src` (consumed) under `key`, atomically."""

    @abstractmethod
    def publish_dir(self, src: Path, key: str) -> Manifest:
        """Publish the files of `src` as the directory `key`: visible complete or not at all."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete a file or a published directory (missing is fine); a directory's
        manifest goes first, so no reader sees it half deleted."""

    # --- reading -------------------------------------------------------------------
    @abstractmethod
    def manifest(self, key: str) -> Manifest | None:
        """The manifest of the published directory `key`, or None when it is not published."""

    @abstractmethod
    def open(self, key: str) -> AbstractContextManager[IO[bytes]]:
        """The bytes of the file `key`, streamed (`ArtifactMissing` when absent)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the file `key` is stored."""

    @abstractmethod
    def entries(self, folder: str) -> list[tuple[str, float]]:
        """(key, mtime) of each entry directly under `folder`, published or not: what the
        sweep looks at to remove what dead attempts left."""

    def local_file(self, key: str, into: Path) -> Path:
        """A local path holding the file `key`: downloaded into the folder `into`."""
        dest = into / key.rsplit("/", 1)[-1]
        try:
            with self.open(key) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest

    def local_dir(self, key: str, into: Path, names: Collection[str] | None = None) -> Path:
        """A local folder holding the published directory `key`: only the files its
        manifest names (of those, only `names` when given), each checked against its sha256
        on the way (`ArtifactCorrupt`), downloaded into `into` (`ArtifactMissing` when it
        is not published)."""
        manifest = self.manifest(key)
        if manifest is None:
            raise ArtifactMissing(f"{key} is not published")
        into.mkdir(parents=True, exist_ok=True)
        for name, entry in manifest.files.items():
            if names is not None and name not in names:
                continue
            with self.open(f"{key}/{name}") as src:
                copy_checked(src, into / name, entry, what=f"{key}/{name}")
        return into

    # --- this host's scratch ---------------------------------------------------------
    @contextmanager
    def temp_dir(self, owner: str | None = None) -> Iterator[Path]:
        """A scratch directory on this host, removed on exit.

        With an `owner` (a job id) it lives under `tmp/<owner>/`, so what a killed
        process left there can be found and removed (`remove_scratch`, the sweep).
        """
        parent = self.scratch_root(owner) if owner is not None else self.scratch
        path = Path(tempfile.mkdtemp(dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def scratch_root(self, owner: str) -> Path:
        """`tmp/<owner>/`, created: the folder all scratch of `owner` (a job id) goes into."""
        path = self.scratch / _scratch_name(owner)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_scratch(self, owner: str) -> None:
        """Delete `tmp/<owner>/` and everything in it (missing is fine)."""
        shutil.rmtree(self.scratch / _scratch_name(owner), ignore_errors=True)

    def scratch_entries(self, owner: str) -> list[tuple[Path, float]]:
        """(path, mtime) of each entry of `tmp/<owner>/` on this host."""
        folder = self.scratch / _scratch_name(owner)
        found = []
        for entry in folder.iterdir() if folder.is_dir() else []:
            try:
                found.append((entry, entry.stat().st_mtime))
            except FileNotFoundError:  # removed since the listing
                continue
        return found

    def scratch_owners(self) -> list[str]:
        """The jobs that have scratch on this host."""
        return [p.name for p in self.scratch.iterdir() if p.name.startswith("ftjob-")]


def _scratch_name(owner: str) -> str:
    if not owner or owner in {".", ".."} or "/" in owner or "\\" in owner:
        raise ValueError(f"not a scratch owner: {owner!r}")
    return owner


def copy_checked(src: IO[bytes], dest: Path, entry: FileEntry, *, what: str) -> None:
    """Copy `src` to `dest` (via a temp name), refusing bytes that are not what `entry`
    records; `dest` exists only when they are."""
    digest, size = hashlib.sha256(), 0
    part = dest.with_name(dest.name + ".part")
    try:
        with open(part, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != entry.size or (entry.sha256 is not None and digest.hexdigest() != entry.sha256):
            raise ArtifactCorrupt(f"{what} does not match the sha256 its manifest records")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks (what rows record of stored files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
