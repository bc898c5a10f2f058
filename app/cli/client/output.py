"""What the client commands print: `--json` bodies as sent, times, the stderr console."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


def print_json(body: Any) -> None:
    """The API's object as the server sent it (scripts parse stdout)."""
    typer.echo(json.dumps(body, indent=2))


def when(epoch: int | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def stderr_console() -> Console:
    """Bars and notes go to stderr, so stdout stays the command's result."""
    return Console(stderr=True)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A table on stdout: rich's in a terminal (ids never cut, other columns may be), plain
    tab-separated lines otherwise, for pipes and scripts."""
    console = Console()
    if not console.is_terminal:
        for row in [headers, *rows]:
            typer.echo("\t".join(row))
        return
    table = Table(box=None)
    longest_id = max((len(row[0]) for row in rows), default=2)
    table.add_column(headers[0], no_wrap=True, min_width=longest_id)
    for header in headers[1:]:
        table.add_column(header, overflow="ellipsis", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
