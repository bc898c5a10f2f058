"""Artifact store on local disk (a shared volume in docker compose).

Keys are relative paths built from server-made ids. Every write goes to a temp path
under the root and is renamed into place, so readers never see half a file or half
an adapter directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root.resolve()
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The absolute path of `key`, refusing anything that escapes the root."""
        path = (self.root / key).resolve()
        if path == self.root or self.root not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    @contextmanager
    def temp_dir(self, owner: str | None = None) -> Iterator[Path]:
        """A scratch directory on the same filesystem, so publishing is a rename.

        With an `owner` (a job id) it lives under `tmp/<owner>/`, so what a killed
        process left there can be found and removed (`remove_scratch`, the sweep).
        """
        parent = self.scratch_root(owner) if owner is not None else self.root / "tmp"
        path = Path(tempfile.mkdtemp(dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def scratch_root(self, owner: str) -> Path:
        """`tmp/<owner>/`, created: the folder all scratch of `owner` (a job id) goes into."""
        path = self.path(_scratch_key(owner))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_scratch(self, owner: str) -> None:
        """Delete `tmp/<owner>/` and everything in it (missing is fine)."""
        self.delete(_scratch_key(owner))

    def publish_file(self, src: Path, key: str) -> Path:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        return dest

    def publish_dir(self, src: Path, key: str) -> Path:
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
        return dest

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _scratch_key(owner: str) -> str:
    if not owner or owner in {".", ".."} or "/" in owner or "\\" in owner:
        raise ValueError(f"not a scratch owner: {owner!r}")
    return f"tmp/{owner}"


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks (what rows record of stored files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
