"""The artifact store's two backends behind one interface, and the object-store rules:
a directory is published manifest-last, readers trust only what a manifest names and
check its sha256, and inference keeps a size-bounded content-addressed cache."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from app.errors import IntegrityFailure
from app.inference.adapter_cache import AdapterCache, entry_name
from app.storage import (
    ArtifactCorrupt,
    ArtifactMissing,
    LocalStore,
    Manifest,
    file_sha256,
    open_store,
)
from app.storage.s3 import S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    url = request.getfixturevalue("s3_storage_url")
    return S3Store(url, scratch=tmp_path / "scratch")


def adapter_dir(path, weights: bytes, config: bytes = b'{"peft_type": "LORA"}'):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(config)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_a_published_directory_reads_back_whole(store, tmp_path) -> None:
    src = adapter_dir(tmp_path / "out", b"w" * 3000)
    manifest = store.publish_dir(src, "adapters/ftjob-1")
    assert manifest.files["adapter_model.safetensors"].size == 3000
    assert store.manifest("adapters/ftjob-1").files.keys() == manifest.files.keys()
    folder = store.local_dir("adapters/ftjob-1", tmp_path / "copy")
    assert (folder / "adapter_model.safetensors").read_bytes() == b"w" * 3000
    assert sorted(p.name for p in folder.iterdir()) == sorted(manifest.files)
    with store.open("adapters/ftjob-1/adapter_config.json") as src_file:
        assert src_file.read() == b'{"peft_type": "LORA"}'
    store.delete("adapters/ftjob-1")
    assert store.manifest("adapters/ftjob-1") is None
    with pytest.raises(ArtifactMissing):
        store.local_dir("adapters/ftjob-1", tmp_path / "again")


def test_a_published_file_is_streamed_back_and_deleted(store, tmp_path) -> None:
    spool = tmp_path / "spool"
    spool.write_bytes(b"line\n" * 1000)
    store.publish_file(spool, "datasets/file-1.jsonl")
    assert not spool.exists() and store.exists("datasets/file-1.jsonl")
    local = store.local_file("datasets/file-1.jsonl", tmp_path)
    assert local.read_bytes() == b"line\n" * 1000
    store.delete("datasets/file-1.jsonl")
    assert not store.exists("datasets/file-1.jsonl")
    with pytest.raises(ArtifactMissing), store.open("datasets/file-1.jsonl"):
        pass


def test_keys_that_escape_the_store_are_refused(store) -> None:
    for key in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.exists(key)


def crash_after(store: S3Store, monkeypatch, uploads: int) -> None:
    """The process dies (an exception here) after `uploads` objects were uploaded."""
    fs = store.fs
    real, done = fs.put_file, []

    def put_file(*args, **kwargs):
        if len(done) == uploads:
            raise KeyboardInterrupt("killed between objects")
        done.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_file)  # fsspec's cached instance: every use


def test_a_crash_between_objects_never_yields_a_loadable_half_adapter(
    s3_storage_url, tmp_path, monkeypatch
) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        crash_after(store, patched, uploads=1)
        store.publish_dir(adapter_dir(tmp_path / "out", b"new"), "adapters/ftjob-2")
    assert [k for k, _ in store.entries("adapters")] == ["adapters/ftjob-2"]  # garbage, seen
    assert store.manifest("adapters/ftjob-2") is None  # but not published
    with pytest.raises(ArtifactMissing):
        store.local_dir("adapters/ftjob-2", tmp_path / "copy")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(IntegrityFailure):
        cache.folder(model_id="ft:x", key="adapters/ftjob-2", sha256=sha(b"new"))
    assert not (
        tmp_path / "cache" / entry_name(key="adapters/ftjob-2", sha256=sha(b"new"))
    ).exists()


def test_republishing_hides_the_old_directory_first(s3_storage_url, tmp_path, monkeypatch):
    """A crash while replacing a directory leaves neither the old nor a mix of both."""
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    store.publish_dir(adapter_dir(tmp_path / "old", b"old"), "checkpoints/ftjob-3/step-2")
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        crash_after(store, patched, uploads=1)
        store.publish_dir(adapter_dir(tmp_path / "new", b"new"), "checkpoints/ftjob-3/step-2")
    assert store.entries("checkpoints/ftjob-3")  # the new config was uploaded: garbage
    assert store.manifest("checkpoints/ftjob-3/step-2") is None


def test_bytes_that_do_not_match_the_manifest_are_refused(s3_storage_url, tmp_path) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    store.publish_dir(adapter_dir(tmp_path / "out", b"good"), "adapters/ftjob-4")
    store.fs.pipe_file(f"{store.base}/adapters/ftjob-4/adapter_model.safetensors", b"evil")
    with pytest.raises(ArtifactCorrupt):
        store.local_dir("adapters/ftjob-4", tmp_path / "copy")
    assert not (tmp_path / "copy" / "adapter_model.safetensors").exists()
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(IntegrityFailure):
        cache.folder(model_id="ft:x", key="adapters/ftjob-4", sha256=sha(b"good"))


def test_the_cache_refuses_an_adapter_whose_weights_are_not_the_recorded_ones(
    s3_storage_url, tmp_path
) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    store.publish_dir(adapter_dir(tmp_path / "out", b"published"), "adapters/ftjob-5")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(IntegrityFailure):
        cache.folder(model_id="ft:x", key="adapters/ftjob-5", sha256=sha(b"registered"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_cache_is_content_addressed_and_evicts_the_least_recently_used(
    s3_storage_url, tmp_path
) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    weights = {n: bytes([n]) * 1000 for n in range(3)}
    for n, blob in weights.items():
        store.publish_dir(adapter_dir(tmp_path / f"out{n}", blob), f"adapters/ftjob-{n}")
    entry_bytes = 1000 + len(b'{"peft_type": "LORA"}')
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=2 * entry_bytes)

    def get(n: int):
        return cache.folder(model_id=f"ft:{n}", key=f"adapters/ftjob-{n}", sha256=sha(weights[n]))

    def entry(n: int):
        return tmp_path / "cache" / entry_name(key=f"adapters/ftjob-{n}", sha256=sha(weights[n]))

    first = get(0)
    assert first == entry(0)  # addressed by content (and key)
    assert (first / "adapter_model.safetensors").read_bytes() == weights[0]
    get(1)
    old = time.time() - 100
    os.utime(entry(1), (old, old))  # 1 is now the least recent
    os.utime(first, (old + 50, old + 50))
    assert get(0) == first  # a hit: no fetch, and it becomes the most recent
    get(2)  # past the bound: the least recently used goes
    cached = {p.name for p in (tmp_path / "cache").iterdir() if p.name != ".incoming"}
    assert cached == {entry(0).name, entry(2).name}
    total = sum(f.stat().st_size for d in cached for f in (tmp_path / "cache" / d).iterdir())
    assert total <= 2 * entry_bytes
    store.delete("adapters/ftjob-0")
    assert get(0) == first  # served from this host's copy, the store is not asked


def test_adapters_with_the_same_weights_keep_their_own_config(s3_storage_url, tmp_path):
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    for n, alpha in ((1, 16), (2, 32)):
        config = b'{"peft_type": "LORA", "lora_alpha": %d}' % alpha
        store.publish_dir(adapter_dir(tmp_path / f"o{n}", b"same", config), f"adapters/ftjob-{n}")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=1 << 20)
    configs = [
        (cache.folder(model_id=f"ft:{n}", key=f"adapters/ftjob-{n}", sha256=sha(b"same"))
         / "adapter_config.json").read_bytes()
        for n in (1, 2)
    ]  # fmt: skip
    assert b'"lora_alpha": 16' in configs[0] and b'"lora_alpha": 32' in configs[1]


def test_one_adapter_larger_than_the_bound_is_still_served(s3_storage_url, tmp_path) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    store.publish_dir(adapter_dir(tmp_path / "out", b"x" * 5000), "adapters/ftjob-9")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=100)
    folder = cache.folder(model_id="ft:9", key="adapters/ftjob-9", sha256=sha(b"x" * 5000))
    assert (folder / "adapter_model.safetensors").stat().st_size == 5000


def test_the_local_backend_serves_its_own_directory(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    store.publish_dir(adapter_dir(tmp_path / "out", b"w"), "adapters/ftjob-1")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=0)
    folder = cache.folder(model_id="ft:1", key="adapters/ftjob-1", sha256=sha(b"w"))
    assert folder == store.path("adapters/ftjob-1") and not (tmp_path / "cache").exists()


def test_the_storage_url_picks_the_backend(tmp_path) -> None:
    from app.config import Settings

    base = {"data_dir": tmp_path}
    assert isinstance(open_store(Settings(**base)), LocalStore)
    assert open_store(Settings(**base)).root == tmp_path / "artifacts"
    local = open_store(Settings(**base, storage_url=f"file://{tmp_path}/elsewhere"))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "elsewhere"
    remote = open_store(Settings(**base, storage_url="s3://bucket/some/prefix/"))
    assert isinstance(remote, S3Store) and remote.base == "bucket/some/prefix"
    assert remote.scratch == tmp_path / "artifacts" / "tmp"  # scratch stays on this host
    with pytest.raises(ValueError, match="LORAFORGE_STORAGE_URL"):
        Settings(**base, storage_url="ftp://host/x")


def test_the_manifest_round_trips() -> None:
    manifest = Manifest.from_bytes(
        b'{"format": 1, "files": {"a": {"size": 3, "sha256": "%s"}}}' % sha(b"abc").encode()
    )
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_the_cache_fetches_only_the_adapter_of_a_checkpoint(s3_storage_url, tmp_path) -> None:
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    src = adapter_dir(tmp_path / "out", b"w")
    (src / "optimizer.pt").write_bytes(b"o" * 4000)
    store.publish_dir(src, "checkpoints/ftjob-1/step-4")
    cache = AdapterCache(store, tmp_path / "cache", max_bytes=1 << 20)
    folder = cache.folder(model_id="ft:c", key="checkpoints/ftjob-1/step-4", sha256=sha(b"w"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_the_sweep_removes_what_a_crash_left_in_the_object_store(
    settings, s3_storage_url, tmp_path, monkeypatch
) -> None:
    from app.jobs.leftovers import remove_dead_attempts_leftovers

    on_s3 = settings.model_copy(update={"storage_url": s3_storage_url})
    store = open_store(on_s3)
    store.publish_dir(adapter_dir(tmp_path / "kept", b"k"), "checkpoints/ftjob-7/step-4")
    for key in ("checkpoints/ftjob-7/step-8", "adapters/ftjob-7"):
        with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
            crash_after(store, patched, uploads=1)
            store.publish_dir(adapter_dir(tmp_path / "half", b"h"), key)
    before = time.time() + 1
    removed = remove_dead_attempts_leftovers(on_s3, ["ftjob-7"], older_than=before)
    # no row records step-4 either (this test has no job): every unrecorded entry goes
    assert sorted(removed) == [
        "adapters/ftjob-7",
        "checkpoints/ftjob-7/step-4",
        "checkpoints/ftjob-7/step-8",
    ]
    assert store.entries("checkpoints/ftjob-7") == store.entries("adapters/ftjob-7") == []
    assert remove_dead_attempts_leftovers(on_s3, ["ftjob-7"], older_than=before) == []


def test_a_large_file_goes_up_in_parts_and_comes_back_whole(
    s3_storage_url, tmp_path, monkeypatch
) -> None:
    from app.storage import s3

    monkeypatch.setattr(s3, "CHUNK", 5 << 20)  # S3's smallest part, to keep the test small
    store = S3Store(s3_storage_url, scratch=tmp_path / "scratch")
    blob = os.urandom(1 << 20) * 11  # 11 MiB: three parts
    (tmp_path / "big").write_bytes(blob)
    store.publish_file(tmp_path / "big", "datasets/file-big.jsonl")
    etag = store.fs.info(f"{store.base}/datasets/file-big.jsonl")["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart upload's ETag counts its parts
    (tmp_path / "back").mkdir()
    assert store.local_file("datasets/file-big.jsonl", tmp_path / "back").read_bytes() == blob


def test_preloaded_adapters_come_from_this_hosts_cache(
    settings, tiny_model_dir, s3_storage_url
) -> None:
    from app.inference.preload import preload_adapters
    from tests.factories import publish_adapter

    on_s3 = settings.model_copy(update={"storage_url": s3_storage_url})
    adapter = publish_adapter(on_s3, tiny_model_dir, org="acme", suffix="pre", seed=1)
    preloaded = {}

    class Engine:  # records what it is handed; the real load is the pool's
        def preload(self, base_model, refs):
            preloaded[base_model] = refs

    wanted = on_s3.model_copy(update={"preload_adapters": [adapter, "ft:unknown"]})
    assert preload_adapters(Engine(), wanted) == [adapter]
    [ref] = preloaded["tiny"]
    assert ref.path.parent == settings.data_dir / "adapter-cache"
    assert file_sha256(ref.path / "adapter_model.safetensors") == ref.sha256


def test_a_dataset_stored_without_a_row_is_removed_after_the_grace_period(
    settings, s3_storage_url, tmp_path
) -> None:
    """An upload stores its bytes before its row commits; a process that died in between
    left an object no row names. The sweep removes it, and never a recorded dataset."""
    from app.db.session import session_scope
    from app.jobs.leftovers import UNRECORDED_DATASET_GRACE_SECONDS, remove_unrecorded_datasets
    from app.tenancy import get_or_create_organization
    from tests.factories import chat_rows, jsonl, store_dataset

    on_s3 = settings.model_copy(update={"storage_url": s3_storage_url})
    store = open_store(on_s3)
    with session_scope(on_s3.sqlalchemy_url) as session:
        org = get_or_create_organization(session, name="acme")
        recorded = store_dataset(
            session, organization=org, store=store, content=jsonl(chat_rows(3))
        )
        recorded_key = recorded.storage_key
    (tmp_path / "orphan").write_bytes(b"{}")
    store.publish_file(tmp_path / "orphan", "datasets/file-orphan.jsonl")
    assert remove_unrecorded_datasets(on_s3, now=time.time()) == []  # still within its grace
    later = time.time() + UNRECORDED_DATASET_GRACE_SECONDS + 1
    assert remove_unrecorded_datasets(on_s3, now=later) == ["datasets/file-orphan.jsonl"]
    assert [key for key, _ in store.entries("datasets")] == [recorded_key]
