"""This host's copy of adapter files: content-addressed, bounded in bytes.

An inference process never assumes it sees the store's disk. Adapter files fetched from an
object store land in `<data dir>/adapter-cache/<weights sha256>-<key hash>/` (`entry_name`:
the registry's sha256 of `adapter_model.safetensors`, so a replaced adapter, which has new
weights, can never be served from a stale copy; and the store key, since two adapters may
share weights but not their `adapter_config.json`, e.g. another `lora_alpha`), each file
checked against the store's manifest on the way in. The least recently used entries are
evicted once they pass `LORAFORGE_ADAPTER_CACHE_BYTES`; the entry just asked for is never
evicted. With the local backend the store's own directory is used (zero copy) and nothing
is cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from app.errors import adapter_weights_changed
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from app.storage import ArtifactCorrupt, ArtifactMissing, ArtifactStore, LocalStore

INCOMING = ".incoming"  # downloads in progress; renamed into place once complete


class AdapterCache:
    def __init__(self, store: ArtifactStore, root: Path, max_bytes: int):
        self.store, self.root, self.max_bytes = store, root, max_bytes

    def folder(self, *, model_id: str, key: str, sha256: str) -> Path:
        """A local folder holding the adapter stored at `key` whose weights hash to `sha256`
        (fetched on a miss); `errors.adapter_weights_changed` when the store has no such
        adapter or its bytes are not the ones recorded."""
        if isinstance(self.store, LocalStore):
            return self.store.path(key)  # the published directory itself
        address = sha256.strip().lower()
        entry = self.root / entry_name(key=key, sha256=address)
        if entry.is_dir():
            os.utime(entry)  # most recently used
            return entry
        try:
            self._fetch(key, address, entry)
        except (ArtifactMissing, ArtifactCorrupt) as exc:
            raise adapter_weights_changed(model_id) from exc
        self.trim(keep=entry)
        return entry

    def _fetch(self, key: str, address: str, entry: Path) -> None:
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=incoming))
        try:
            manifest = self.store.manifest(key)
            weights = manifest.files.get(ADAPTER_WEIGHTS) if manifest else None
            if weights is None or weights.sha256 != address:
                raise ArtifactCorrupt(f"{key} does not hold the weights recorded for it")
            # a checkpoint's resume state (optimizer, RNG) is never served: not fetched
            self.store.local_dir(key, tmp / "files", names=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))
            try:
                os.rename(tmp / "files", entry)
            except OSError:  # another thread or process fetched it first: same content
                if not entry.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def trim(self, *, keep: Path | None = None) -> list[Path]:
        """Evict the least recently used entries until the cache fits its bound."""
        entries = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            if path.name == INCOMING or not path.is_dir():
                continue
            try:
                size = sum(f.stat().st_size for f in path.iterdir())
                entries.append((path.stat().st_mtime, path, size))
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
        total = sum(size for _, _, size in entries)
        evicted = []
        for _, path, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            evicted.append(path)
        return evicted


def entry_name(*, key: str, sha256: str) -> str:
    """The cache folder of the adapter stored at `key` whose weights hash to `sha256`."""
    return f"{sha256}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def adapter_cache(store: ArtifactStore, *, data_dir: Path, max_bytes: int) -> AdapterCache:
    """This process's cache under the data dir (its state is the directory itself)."""
    return AdapterCache(store, data_dir / "adapter-cache", max_bytes)
