"""The `loraforge` client commands (files, jobs, models, chat) against a real HTTP server:
this process's API under uvicorn, driven through typer's CliRunner as a user types them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from app.cli.client import files as files_cli
from app.cli.client import watch
from app.cli.main import cli
from app.db.models import Job
from app.db.session import session_scope
from app.jobs import event_feed
from app.ml.adapters import ADAPTER_WEIGHTS
from app.schemas.common import ListPage
from app.schemas.files import FileRead
from app.schemas.inference import ChatCompletionResponse
from app.schemas.jobs import EventRead, JobRead
from app.schemas.models import ModelRead
from app.storage import file_sha256
from tests.e2e.stack import serving
from tests.factories import chat_rows, jsonl, publish_adapter


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_feed, "POLL_SECONDS", 0.05)


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as base_url:
        yield base_url


@pytest.fixture
def key(client) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def run(server, key, monkeypatch):
    """`loraforge ARGS…` with LORAFORGE_BASE_URL/LORAFORGE_API_KEY pointing at the server."""
    for name in ("LORAFORGE_BASE_URL", "LORAFORGE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    env = {"LORAFORGE_BASE_URL": server, "LORAFORGE_API_KEY": key}

    def invoke(*args: str, input: str | None = None, **extra_env: str):
        return CliRunner().invoke(cli, list(args), env=env | extra_env, input=input)

    return invoke


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(chat_rows(6)))
    return path


def test_files_upload_list_delete_with_json_as_the_api_object(run, dataset) -> None:
    uploaded = run("files", "upload", str(dataset), "--json")
    assert uploaded.exit_code == 0, uploaded.output
    file = FileRead.model_validate_json(uploaded.stdout)
    assert file.bytes == dataset.stat().st_size and file.filename == "train.jsonl"
    listed = run("files", "list", "--json")
    assert [f.id for f in ListPage[FileRead].model_validate_json(listed.stdout).data] == [file.id]
    assert file.id in run("files", "list").stdout
    deleted = run("files", "delete", file.id)
    assert deleted.exit_code == 0 and deleted.stdout.strip() == f"deleted {file.id}"
    assert json.loads(run("files", "list", "--json").stdout)["data"] == []


def test_a_bad_line_is_reported_with_its_number(run, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(chat_rows(2)) + b'{"messages": "nope"}\n')
    result = run("files", "upload", str(bad))
    assert result.exit_code == 1 and result.stdout == ""
    assert "line 3" in result.stderr and "(param: file)" in result.stderr


def test_a_large_upload_shows_progress_and_arrives_whole(run, dataset, monkeypatch) -> None:
    monkeypatch.setattr(files_cli, "LARGE_FILE_BYTES", 10)  # the bar for this small file
    read: list[int] = []
    real_read = files_cli._Counted.read
    monkeypatch.setattr(
        files_cli._Counted, "read", lambda self, n=-1: read.append(n) or real_read(self, n)
    )
    result = run("files", "upload", str(dataset))
    assert result.exit_code == 0, result.output
    file_id, size, name = result.stdout.strip().split("\t")
    assert read and size == f"{dataset.stat().st_size} bytes" and name == "train.jsonl"
    assert file_id.startswith("file-")


def test_jobs_create_uploads_a_path_and_sends_hyperparameters(run, dataset, enqueued) -> None:
    args = ["jobs", "create", "--model", "tiny", "--file", str(dataset), "--suffix", "cli"]
    hp = ["--hp", "n_epochs=2", "--hp", "learning_rate=1e-3", "--hp", "lr_scheduler=cosine"]
    result = run(*args, *hp, "--json")
    assert result.exit_code == 0, result.output
    job = JobRead.model_validate_json(result.stdout)
    assert enqueued == [job.id] and job.suffix == "cli" and job.status == "queued"
    assert job.hyperparameters["n_epochs"] == 2 and job.hyperparameters["learning_rate"] == 1e-3
    assert job.hyperparameters["lr_scheduler"] == "cosine"
    again = run("jobs", "create", "--model", "tiny", "--file", job.training_file, "--json")
    assert JobRead.model_validate_json(again.stdout).training_file == job.training_file
    got = JobRead.model_validate_json(run("jobs", "get", job.id, "--json").stdout)
    assert got.id == job.id
    page = ListPage[JobRead].model_validate_json(run("jobs", "list", "--json").stdout)
    assert {j.id for j in page.data} == {job.id, JobRead.model_validate_json(again.stdout).id}
    events = ListPage[EventRead].model_validate_json(run("jobs", "events", job.id, "--json").stdout)
    assert events.data[-1].message == f"Created fine-tuning job: {job.id}"
    assert f"Created fine-tuning job: {job.id}" in run("jobs", "events", job.id).stdout
    bad = run(*args, "--hp", "n_epochs")
    assert bad.exit_code == 2 and "key=value" in bad.stderr
    unknown = run(*args, "--hp", "nonsense=1")
    assert unknown.exit_code == 1 and "nonsense" in unknown.stderr


def test_watch_exits_2_when_the_job_is_cancelled_while_watched(
    run, dataset, server, key, monkeypatch
) -> None:
    cancelled: list[str] = []
    real_show = watch.Board.show_event

    def cancel_once_watched(board, event) -> None:
        real_show(board, event)
        if not cancelled:  # the first event came through the stream: cancel the job now
            job_id = event.message.split(": ")[-1]
            url = f"{server}/v1/fine_tuning/jobs/{job_id}/cancel"
            httpx.post(url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
            cancelled.append(job_id)

    monkeypatch.setattr(watch.Board, "show_event", cancel_once_watched)
    result = run("jobs", "create", "--model", "tiny", "--file", str(dataset), "--watch")
    assert result.exit_code == 2, result.output
    assert cancelled and f"job {cancelled[0]} was cancelled" in result.stderr
    again = run("jobs", "watch", cancelled[0], "--json")  # already ended: at once, as JSON
    assert again.exit_code == 2 and JobRead.model_validate_json(again.stdout).status == "cancelled"


# what the pause test does once the watch shows an event: Created -> pause -> resume -> cancel
_NEXT_ACTION = {"Created fine-tuning job": "pause", "paused": "resume", "resumed": "cancel"}


def test_watch_shows_a_paused_job_and_follows_it_after_its_resume(
    run, dataset, server, key, monkeypatch
) -> None:
    shown: list[str] = []
    real_show_job, real_show_event = watch.Board.show_job, watch.Board.show_event

    def record(board, job) -> None:
        shown.append(job.status)
        real_show_job(board, job)

    job: list[str] = []

    def pause_resume_cancel(board, event) -> None:
        real_show_event(board, event)
        if not job:  # the first event came through the stream: pause the (queued) job
            job.append(event.message.split(": ")[-1])
        url, headers = f"{server}/v1/fine_tuning/jobs/{job[0]}", {"Authorization": f"Bearer {key}"}
        action = next((a for seen, a in _NEXT_ACTION.items() if seen in event.message), None)
        if action is not None:
            httpx.post(f"{url}/{action}", headers=headers, timeout=10)

    monkeypatch.setattr(watch.Board, "show_job", record)
    monkeypatch.setattr(watch.Board, "show_event", pause_resume_cancel)
    result = run("jobs", "create", "--model", "tiny", "--file", str(dataset), "--watch")
    assert result.exit_code == 2, result.output  # it followed the job past its pause
    assert "paused before it started" in result.stderr
    # the bar showed each status as its event came: paused, then queued again
    assert "paused" in shown, shown
    assert shown[shown.index("paused") :][:2] == ["paused", "queued"], shown
    assert shown[-1] == "cancelled"


def test_watch_exits_1_with_the_error_for_a_failed_job(run, dataset, settings) -> None:
    created = run("jobs", "create", "--model", "tiny", "--file", str(dataset), "--json")
    job_id = json.loads(created.stdout)["id"]
    error = {"code": "training_error", "message": "out of memory", "param": None}
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="failed", error=error))
    result = run("jobs", "watch", job_id)
    assert result.exit_code == 1
    assert f"job {job_id} failed: training_error: out of memory" in result.stderr


def test_base_url_and_key_come_from_flags_then_loraforge_then_openai_variables(
    run, server, key
) -> None:
    openai_only = {"LORAFORGE_BASE_URL": "", "LORAFORGE_API_KEY": ""}
    via_openai = run(
        "models", "list", "--json", **openai_only,
        OPENAI_BASE_URL=f"{server}/v1", OPENAI_API_KEY=key,
    )  # fmt: skip
    assert via_openai.exit_code == 0, via_openai.output
    loraforge_wins = run("models", "list", OPENAI_API_KEY="lf-wrong")
    assert loraforge_wins.exit_code == 0, loraforge_wins.output
    flag_wins = run("models", "list", "--api-key", "lf-wrong")
    assert flag_wins.exit_code == 1 and "API key" in flag_wins.stderr
    no_key = run("models", "list", LORAFORGE_API_KEY="")
    assert no_key.exit_code == 2 and "no API key" in no_key.stderr
    nowhere = run("models", "list", "--base-url", "http://127.0.0.1:9")
    assert nowhere.exit_code == 1 and "cannot reach the server" in nowhere.stderr


@pytest.mark.slow
def test_models_list_download_delete(run, settings, tiny_model_dir, tmp_path) -> None:
    adapter = publish_adapter(settings, tiny_model_dir, org="acme", suffix="dl", seed=1)
    models = ListPage[ModelRead].model_validate_json(run("models", "list", "--json").stdout)
    assert {"tiny", adapter} <= {m.id for m in models.data}
    out = tmp_path / "adapter"
    result = run("models", "download", adapter, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    recorded = next(m.sha256 for m in models.data if m.id == adapter)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert shown["weights_sha256"] == file_sha256(out / ADAPTER_WEIGHTS) == recorded
    deleted = run("models", "delete", adapter)
    assert deleted.exit_code == 0 and deleted.stdout.startswith(f"deleted {adapter}")
    gone = run("models", "download", adapter, "-o", str(tmp_path / "again"))
    assert gone.exit_code == 1 and adapter in gone.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_chat_one_shot_interactive_and_json(run) -> None:
    once = run("chat", "--model", "tiny", "--max-tokens", "4", "--temperature", "0", "hello")
    assert once.exit_code == 0, once.output
    assert once.stdout.endswith("\n")
    greedy = ["--model", "tiny", "--max-tokens", "4", "--temperature", "0"]
    as_json = run("chat", *greedy, "hello", "--json")
    answer = ChatCompletionResponse.model_validate_json(as_json.stdout)
    assert answer.choices[0].message.content + "\n" == once.stdout  # streamed = whole, greedy
    talk = run("chat", "--model", "tiny", "--max-tokens", "4", input="hello\nagain\n/exit\n")
    assert talk.exit_code == 0, talk.output
    assert talk.stdout.count("> ") == 3
    unknown = run("chat", "--model", "nope", "hi")
    assert unknown.exit_code == 1 and "nope" in unknown.stderr


def test_jobs_pause_and_resume(run, dataset) -> None:
    created = run("jobs", "create", "--model", "tiny", "--file", str(dataset), "--json")
    job_id = json.loads(created.stdout)["id"]
    paused = run("jobs", "pause", job_id)
    assert paused.exit_code == 0 and "paused" in paused.stdout, paused.output
    resumed = run("jobs", "resume", job_id, "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["status"] == "queued"
