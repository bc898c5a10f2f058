"""The `loraforge` client commands: talk to a server over HTTP (files, jobs, models, chat)."""

from __future__ import annotations

import typer

from app.cli.client.chat import chat
from app.cli.client.files import files_cli
from app.cli.client.jobs import jobs_cli
from app.cli.client.models import models_cli


def register(cli: typer.Typer) -> None:
    """Add the client commands to the `loraforge` command."""
    cli.add_typer(files_cli, name="files")
    cli.add_typer(jobs_cli, name="jobs")
    cli.add_typer(models_cli, name="models")
    cli.command()(chat)
