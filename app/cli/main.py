"""The `loraforge` command (typer): run the stack, migrate, manage keys, build a demo model;
the client commands (app/cli/client) talk to a running server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from app.cli.client import register as register_client_commands
from app.config import Settings, get_settings

cli = typer.Typer(
    help="loraforge: LoRA fine-tuning and multi-adapter serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
db_cli = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
register_client_commands(cli)  # files, jobs, models, chat: a server's API over HTTP

Host = Annotated[str, typer.Option(help="Interface to bind.")]
Port = Annotated[int, typer.Option(help="TCP port.")]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the database, artifacts and broker live (overrides LORAFORGE_DATA_DIR; "
        "default: a per-user directory, the same wherever loraforge is started).",
        show_default=False,
    ),
]
FIRST_RUN_OR_ELSEWHERE = (
    "\n  New install or older schema: run `loraforge db upgrade` (`loraforge up` migrates itself)."
    "\n  Does your server keep its data elsewhere? Point at it: `loraforge --data-dir DIR ...`"
    " or LORAFORGE_DATA_DIR=DIR (LORAFORGE_DATABASE_URL for PostgreSQL)."
)


@cli.callback()
def _options(data_dir: DataDir = None) -> None:
    if data_dir is not None:  # through the environment, so `up`'s children see it too
        os.environ["LORAFORGE_DATA_DIR"] = str(data_dir.expanduser().absolute())
        get_settings.cache_clear()


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _where(settings: Settings) -> None:
    """Say where the data lives, on stderr (stdout stays the command's output)."""
    from app.migrate import shown_url

    source = "LORAFORGE_DATA_DIR" if "data_dir" in settings.model_fields_set else "the default"
    typer.echo(f"loraforge data dir: {settings.data_dir} ({source})", err=True)
    typer.echo(f"loraforge database: {shown_url(settings.sqlalchemy_url)}", err=True)
    old = Path.cwd() / ".loraforge"
    if source == "the default" and (old / "loraforge.db").is_file():
        typer.echo(
            f"note: {old} holds a database from the old default (./.loraforge), not used here; "
            f"to keep using it, set LORAFORGE_DATA_DIR={old}",
            err=True,
        )


def _require_current_schema(settings: Settings, *, unreachable_is_fatal: bool) -> None:
    """Refuse, naming the database and the fix, unless its schema is current."""
    from sqlalchemy.exc import OperationalError

    from app.migrate import schema_problem, shown_url

    try:
        problem = schema_problem(settings)
    except OperationalError as exc:
        message = f"cannot reach the database {shown_url(settings.sqlalchemy_url)}: {exc.orig}"
        if unreachable_is_fatal:
            raise _fail(message) from None
        typer.echo(f"warning: {message} (requests answer 503 until it is back)", err=True)
        return
    if problem is not None:
        raise _fail(problem + FIRST_RUN_OR_ELSEWHERE)


def _upgrade(settings: Settings, revision: str = "head") -> None:
    from sqlalchemy.exc import OperationalError

    from app import migrate

    try:
        migrate.upgrade(settings, revision)
    except OperationalError as exc:
        url = migrate.shown_url(settings.sqlalchemy_url)
        raise _fail(f"cannot reach the database {url}: {exc.orig}") from None


def _check_base_models(settings: Settings) -> None:
    """Name every allowlist entry that cannot load, and why, before serving anything."""
    from app.base_models import explain, unavailable

    bad = unavailable(settings.base_models)
    usable = [name for name in settings.base_models if name not in bad]
    typer.echo(f"loraforge base models: {', '.join(usable) or 'none usable'}", err=True)
    for name, reason in bad.items():
        typer.echo(f"error: {explain(name, settings.base_models[name], reason)}", err=True)


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    settings = get_settings()
    _where(settings)
    _upgrade(settings, revision)


@db_cli.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    from app import migrate

    migrate.downgrade(get_settings(), revision)


def _open_database() -> None:
    settings = get_settings()
    _where(settings)
    _require_current_schema(settings, unreachable_is_fatal=True)


@keys_cli.command("create")
def keys_create(
    org: Annotated[str, typer.Option(help="Organization name (created if new).")],
) -> None:
    """Create an API key for ORG; prints only the key."""
    from app import tenancy
    from app.db.session import session_scope
    from app.errors import InvalidRequest

    _open_database()
    try:
        with session_scope() as session:
            organization = tenancy.get_or_create_organization(session, name=org)
            secret = tenancy.create_api_key(session, organization=organization)
    except InvalidRequest as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(secret)


@keys_cli.command("list")
def keys_list(
    org: Annotated[str | None, typer.Option(help="Only this organization's keys.")] = None,
) -> None:
    """List keys: id, organization, prefix, created, revoked (never a secret)."""
    from app import tenancy
    from app.db.session import session_scope

    _open_database()
    with session_scope() as session:
        for key, name in tenancy.list_api_keys(session, organization=org):
            revoked = key.revoked_at.isoformat() if key.revoked_at else "-"
            typer.echo(f"{key.id}\t{name}\t{key.prefix}…\t{key.created_at.isoformat()}\t{revoked}")


@keys_cli.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke the key KEY_ID (from `keys list`); it is refused from then on."""
    from app import tenancy
    from app.db.session import session_scope
    from app.errors import NotFound

    _open_database()
    try:
        with session_scope() as session:
            tenancy.revoke_key(session, key_id=key_id)
    except NotFound as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"revoked {key_id}")


@cli.command()
def api(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Run the HTTP API, the control plane: files, jobs, models, keys, admin, the dashboard;
    it also serves inference unless LORAFORGE_INFERENCE_ENABLED=false (then no base model
    is loaded here and the inference routes answer 503)."""
    _run_server("app.main:create_app", host, port)


@cli.command()
def serve(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Run an inference-only server for a GPU inference node: /v1/chat/completions,
    /v1/completions, /v1/models (what it serves) and /health, with the same API keys,
    registry and errors as `api`; no files, jobs or admin routes. Adapters come from the
    artifact store (LORAFORGE_STORAGE_URL) and the registry (LORAFORGE_DATABASE_URL)."""
    if not get_settings().inference_enabled:
        raise _fail("`serve` only serves inference: unset LORAFORGE_INFERENCE_ENABLED=false")
    _run_server("app.main:create_serve_app", host, port)


def _run_server(factory: str, host: str, port: int) -> None:
    import uvicorn

    settings = get_settings()
    _where(settings)
    _check_base_models(settings)
    _require_current_schema(settings, unreachable_is_fatal=False)
    uvicorn.run(factory, factory=True, host=host, port=port, log_level="info")


Queues = Annotated[
    str,
    typer.Option(
        "--queues",
        "--queue",
        help="Comma-separated queues to consume: training queues (`training`, or those "
        "LORAFORGE_MODEL_QUEUES routes base models to, e.g. gpu-80g,training), or `webhooks` "
        "alone (webhook deliveries).",
    ),
]


@cli.command()
def worker(concurrency: int = 1, queues: Queues = "training") -> None:
    """Run one Celery worker on training queues (one job per GPU; it claims only jobs of
    the base models routed to its queues), or with `--queues webhooks` one that sends
    webhook deliveries (never behind a training job)."""
    from app.jobs.routing import parse_queue_names
    from app.webhooks.queue import WEBHOOK_QUEUE

    try:
        names = parse_queue_names(queues, setting="--queues")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queues") from None
    if WEBHOOK_QUEUE in names and len(names) > 1:
        raise typer.BadParameter(
            f"{WEBHOOK_QUEUE} takes a worker of its own", param_hint="--queues"
        )
    os.environ["LORAFORGE_WORKER_QUEUES"] = ",".join(names)  # its claims and heartbeat read it
    get_settings.cache_clear()
    settings = get_settings()
    _where(settings)
    if WEBHOOK_QUEUE not in names:  # a webhooks worker loads no model
        _check_base_models(settings)
    _require_current_schema(settings, unreachable_is_fatal=False)
    # exec, so signals reach Celery directly; by module name, since app never imports worker.
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        "-Q",
        ",".join(names),
        "--pool=prefork",
    ]
    os.execv(sys.executable, argv)


@cli.command()
def up(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Migrate, then run the API and one worker as child processes; Ctrl-C stops both."""
    settings = get_settings()
    _where(settings)
    _check_base_models(settings)
    _upgrade(settings)
    me = [sys.executable, "-m", "app.cli"]
    children = [
        subprocess.Popen([*me, "api", "--host", host, "--port", str(port)]),
        subprocess.Popen([*me, "worker", "--queues", _every_training_queue(settings)]),
        subprocess.Popen([*me, "worker", "--queues", "webhooks", "--concurrency", "2"]),
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    _stop_children(children)
    raise typer.Exit(0 if stopping else 1)


def _every_training_queue(settings: Settings) -> str:
    """All on one machine: `up`'s worker consumes every queue a base model is routed to."""
    from app.jobs.routing import DEFAULT_QUEUE

    return ",".join(dict.fromkeys([DEFAULT_QUEUE, *settings.model_queues.values()]))


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # warm shutdown: uvicorn drains, celery re-queues
    deadline = time.monotonic() + 30
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@cli.command("tiny-model")
def tiny_model(out: Path) -> None:
    """Build a tiny random-init causal LM + tokenizer at OUT (for demos and tests)."""
    from app.ml.tiny_model import build_tiny_model

    typer.echo(build_tiny_model(out))


@cli.command()
def demo(port: Port = 8765) -> None:
    """Fine-tune an adapter on a tiny local model through the API and print its reply."""
    from app.cli.demo import run_demo

    run_demo(port=port)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()


if __name__ == "__main__":
    main()
