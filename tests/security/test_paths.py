"""10,000 hostile names as file names, suffixes and metadata: nothing written outside the store."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from app import tenancy
from app.db.session import session_scope
from app.errors import InvalidRequest
from app.jobs import service as jobs
from app.schemas.jobs import JobCreate
from app.storage import LocalStore
from tests.factories import chat_rows, jsonl, store_dataset, upload, uploaded_file

KNOWN_BAD = [
    "../../../../etc/passwd", "..", ".", "/", "/etc/passwd", "/tmp/x.jsonl", "..\\..\\win.ini",
    "C:\\Windows\\x.jsonl", "%2e%2e%2f%2e%2e%2fx.jsonl", "%252e%252e%252f", "..%2f..%2fx",
    "a\x00b.jsonl", "\x00", "x.jsonl\x00.txt", "\u2024\u2024/\u2024\u2024/x", "\uff0e\uff0e\uff0fx",
    "..\u2215..\u2215x", "\u202e", "lpt1", "con.jsonl", "~/.ssh/authorized_keys", "$HOME/x",
    "`id`", "$(id)", "a/../../b.jsonl", "./../x.jsonl", "x" * 4096, "../" * 1000 + "x.jsonl",
    "\r\nSet-Cookie: a=b", "<script>", "'; DROP TABLE file; --", "\\\\server\\share\\x",
    "file:///etc/passwd", "datasets/../../x", "tmp/../../x.jsonl",
]  # fmt: skip
ALPHABET = "./\\%\x00\u2024\uff0e\uff0f\u2215~$:aZ9_-\u00e9 \t\n"


def hostile_names(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    names = list(KNOWN_BAD)
    while len(names) < count:
        piece = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        names.append(rng.choice(["", "../", "/", "..\\"]) * rng.randint(0, 20) + piece)
    return names[:count]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    folder = tmp_path / "canary"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "passwd").write_text("root:x:0:0\n")
    return folder


def assert_only_expected_files(settings) -> None:
    """Every file under the data dir is the DB or a dataset named by a server-made id."""
    for path in settings.data_dir.rglob("*"):
        assert not path.is_symlink(), path
        if path.is_dir():
            continue
        relative = path.relative_to(settings.data_dir).as_posix()
        assert relative.startswith("loraforge.db") or (
            relative.startswith("artifacts/datasets/file-") and relative.endswith(".jsonl")
            and "/" not in relative.removeprefix("artifacts/datasets/")
        ), relative  # fmt: skip


@pytest.mark.slow
def test_hostile_names_never_leave_the_store(settings, canary) -> None:
    before = tree_digest(canary)
    store, content = LocalStore(settings.artifacts_dir), jsonl(chat_rows(1))
    names = hostile_names(10_000)
    stored = refused = 0
    with session_scope(settings.sqlalchemy_url) as session:
        org = tenancy.get_or_create_organization(session, name="acme")
        for i, name in enumerate(names):
            filename = name + ".jsonl" if i % 2 else name
            try:
                row = store_dataset(
                    session, organization=org, store=store, content=content, filename=filename
                )
            except InvalidRequest:
                refused += 1
                continue
            stored += 1
            assert row.storage_key == f"datasets/{row.id}.jsonl"
            assert "/" not in row.filename and "\x00" not in row.filename
            assert len(row.filename) <= 255
        training_file = row.id
        labels = _names_as_labels(session, org, names, training_file, settings.base_models)
    print(f"\n10,000 names: files stored {stored}, refused {refused}; job labels {labels}")
    assert stored > 1000 and refused > 1000  # both paths were exercised
    assert tree_digest(canary) == before
    assert_only_expected_files(settings)
    assert labels["suffix_ok"] and labels["suffix_refused"] and labels["metadata_ok"]


def _names_as_labels(session, org, names, training_file, base_models) -> dict:
    """The same names as job suffixes and metadata: refused (400) or kept as labels only."""
    counts = {"suffix_ok": 0, "suffix_refused": 0, "metadata_ok": 0, "metadata_refused": 0}
    for i, name in enumerate(names[:2000]):
        for field, body in (
            ("suffix", {"suffix": name}),
            ("metadata", {"metadata": {name[:64]: name[:512]}}),
        ):
            try:
                request = JobCreate(model="tiny", training_file=training_file, seed=i, **body)
            except ValidationError:
                counts[f"{field}_refused"] += 1
                continue
            jobs.create_job(session, organization=org, request=request, base_models=base_models)
            counts[f"{field}_ok"] += 1
    return counts


def test_hostile_names_through_the_api(client, settings, canary) -> None:
    before, settings.max_active_jobs = tree_digest(canary), 0  # many jobs on purpose
    file_id = uploaded_file(client, 3)
    for name in KNOWN_BAD:
        response = upload(client, jsonl(chat_rows(1)), name=name + ".jsonl")
        assert response.status_code in (200, 400), (name, response.text)
        if response.status_code == 200:
            shown = response.json()["filename"]
            assert "/" not in shown and "\\" not in shown and "\x00" not in shown
        for body in ({"suffix": name}, {"metadata": {name[:64]: name[:512]}}):
            job = client.post(
                "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, **body}
            )
            assert job.status_code in (200, 400), (name, job.text)
    assert tree_digest(canary) == before
    assert_only_expected_files(settings)


def test_store_refuses_keys_that_escape_and_symlinked_folders(settings, canary) -> None:
    store = LocalStore(settings.artifacts_dir)
    for key in ("../x", "/etc/passwd", "datasets/../../x", "", "."):
        with pytest.raises(ValueError):
            store.path(key)
    os.symlink(canary, settings.artifacts_dir / "datasets")  # planted by someone with disk access
    with pytest.raises(ValueError):
        store.path("datasets/file-x.jsonl")
