"""`loraforge jobs …`: create (optionally watching it to the end), list, get, events, cancel,
pause, resume, watch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.client.connection import DEFAULT_BASE_URL, Api, ApiKey, AsJson, BaseUrl, connect
from app.cli.client.files import upload_file
from app.cli.client.output import print_json, print_table, stderr_console, when
from app.cli.client.watch import exit_code, watch_job
from app.schemas.common import ListPage
from app.schemas.jobs import EventRead, JobRead

jobs_cli = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)

JobId = Annotated[str, typer.Argument(help="A job id (ftjob-…).")]
Reconnect = Annotated[
    float,
    typer.Option(help="While watching, give up after this many seconds without the server."),
]


def parse_hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is read as JSON when it is JSON (3, 1e-4, true, [..]),
    else as a string ("auto", "cosine"). The server checks names and values."""
    hyperparameters: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--hp")
        try:
            hyperparameters[key] = json.loads(raw)
        except ValueError:
            hyperparameters[key] = raw
    return hyperparameters


def _file_id(api: Api, path_or_id: str, *, quiet: bool) -> str:
    """A local file is uploaded first; anything else is taken as a file id."""
    path = Path(path_or_id).expanduser()
    if not path.is_file():
        return path_or_id
    uploaded = upload_file(api, path, quiet=quiet)
    if not quiet:
        stderr_console().print(f"uploaded {path} as {uploaded['id']}", highlight=False)
    return str(uploaded["id"])


@jobs_cli.command("create")
def create(
    model: Annotated[str, typer.Option(help="A base model, or an ft: adapter to continue.")],
    file: Annotated[
        str, typer.Option("--file", help="A local JSONL file (uploaded) or a file id.")
    ],
    validation_file: Annotated[
        str | None, typer.Option(help="A local JSONL file or a file id.")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    hp: Annotated[
        list[str] | None, typer.Option("--hp", help="A hyperparameter, key=value (repeatable).")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Show live progress to the end.")] = False,
    reconnect_seconds: Reconnect = 300.0,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Create a fine-tuning job; with --watch, follow it and exit 0/1/2 as it succeeds, fails
    or is cancelled."""
    body: dict[str, Any] = {"model": model}
    if hp:
        body["hyperparameters"] = parse_hyperparameters(hp)
    if suffix is not None:
        body["suffix"] = suffix
    with connect(base_url, api_key) as api:
        body["training_file"] = _file_id(api, file, quiet=as_json)
        if validation_file is not None:
            body["validation_file"] = _file_id(api, validation_file, quiet=as_json)
        created = api.call("POST", "/fine_tuning/jobs", json=body)
        if not watch:
            return print_json(created) if as_json else _show_job(JobRead.model_validate(created))
        if not as_json:
            stderr_console().print(f"created {created['id']}", highlight=False)
        _watch(api, created["id"], as_json=as_json, reconnect_seconds=reconnect_seconds)


@jobs_cli.command("watch")
def watch(
    job_id: JobId,
    reconnect_seconds: Reconnect = 300.0,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Live progress until the job ends; exit 0 succeeded, 1 failed, 2 cancelled."""
    with connect(base_url, api_key) as api:
        _watch(api, job_id, as_json=as_json, reconnect_seconds=reconnect_seconds)


def _watch(api: Api, job_id: str, *, as_json: bool, reconnect_seconds: float) -> None:
    console = stderr_console()
    if as_json:
        console.quiet = True  # stdout holds the job only, stderr nothing but errors
    job = watch_job(api, job_id, console=console, reconnect_seconds=reconnect_seconds)
    if as_json:
        print_json(api.call("GET", f"/fine_tuning/jobs/{job_id}"))
    elif job.fine_tuned_model:
        typer.echo(job.fine_tuned_model)
    if job.error is not None:
        typer.echo(f"error: job {job.id} failed: {job.error.code}: {job.error.message}", err=True)
    elif exit_code(job) == 2:
        typer.echo(f"job {job.id} was cancelled", err=True)
    raise typer.Exit(exit_code(job))


@jobs_cli.command("list")
def list_jobs(
    limit: int = 20,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """This organization's jobs, newest first."""
    with connect(base_url, api_key) as api:
        body = api.call("GET", "/fine_tuning/jobs", params={"limit": limit})
    if as_json:
        return print_json(body)
    rows = []
    for job in ListPage[JobRead].model_validate(body).data:
        steps = f"{job.steps_completed or 0}/{job.steps_planned}" if job.steps_planned else "-"
        created = when(job.created_at)
        rows.append([job.id, job.model, job.status, steps, job.fine_tuned_model or "-", created])
    print_table(["id", "model", "status", "steps", "fine-tuned model", "created"], rows)


@jobs_cli.command("get")
def get(
    job_id: JobId,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """One job."""
    with connect(base_url, api_key) as api:
        body = api.call("GET", f"/fine_tuning/jobs/{job_id}")
    return print_json(body) if as_json else _show_job(JobRead.model_validate(body))


@jobs_cli.command("events")
def events(
    job_id: JobId,
    limit: int = 100,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """The job's newest events (up to --limit), printed oldest first."""
    with connect(base_url, api_key) as api:
        body = api.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": limit})
    if as_json:
        return print_json(body)
    for event in reversed(ListPage[EventRead].model_validate(body).data):
        typer.echo(f"{when(event.created_at)}  {event.level:5}  {event.message}")


@jobs_cli.command("cancel")
def cancel(
    job_id: JobId,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a job (a running one stops at its next micro-batch)."""
    _act(job_id, "cancel", base_url=base_url, api_key=api_key, as_json=as_json)


@jobs_cli.command("pause")
def pause(
    job_id: JobId,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Pause a job: a running one checkpoints at its next step and shows `paused`."""
    _act(job_id, "pause", base_url=base_url, api_key=api_key, as_json=as_json)


@jobs_cli.command("resume")
def resume(
    job_id: JobId,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Resume a paused job: queued again, it continues from its checkpoint."""
    _act(job_id, "resume", base_url=base_url, api_key=api_key, as_json=as_json)


def _act(job_id: str, action: str, *, base_url: str, api_key: str | None, as_json: bool) -> None:
    with connect(base_url, api_key) as api:
        body = api.call("POST", f"/fine_tuning/jobs/{job_id}/{action}")
    return print_json(body) if as_json else _show_job(JobRead.model_validate(body))


def _show_job(job: JobRead) -> None:
    rows = {
        "id": job.id,
        "status": job.status,
        "model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "steps": f"{job.steps_completed}/{job.steps_planned}" if job.steps_planned else None,
        "trained_tokens": job.trained_tokens,
        "estimated_finish": when(job.estimated_finish) if job.estimated_finish else None,
        "fine_tuned_model": job.fine_tuned_model,
        "best_step": job.best_step,
        "error": f"{job.error.code}: {job.error.message}" if job.error else None,
        "hyperparameters": json.dumps(job.hyperparameters),
    }
    for name, value in rows.items():
        if value is not None:
            typer.echo(f"{name + ':':18}{value}")
