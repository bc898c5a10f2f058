"""`--watch` / `jobs watch`: a live bar over a job's event stream, to the job's end.

The bar follows `GET …/events?stream=true` (SSE). A stream that drops (the server restarts,
the network blips) is reopened after the last event seen (`Last-Event-ID`), with a backoff
of 0.5 s doubling up to 10 s, for at most `reconnect_seconds` without an answer; meanwhile
the job itself is read for its progress. The exit code says how the job ended.

A paused job has not ended: the bar shows `paused` (the job is re-read at every event that
is not a metrics one) and the watch waits for it to resume and end; Ctrl-C leaves the job
as it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from app.cli.client.connection import Api, ApiError
from app.schemas.jobs import EventRead, JobRead
from app.statuses import TERMINAL_JOB_STATUSES, JobStatus

EXIT_CODES = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELLED: 2}
FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS = 0.5, 10.0
JOB_REFRESH_SECONDS = 5.0  # how often the bar re-reads the job (its ETA) while events flow


class StreamDropped(Exception):
    """The stream ended before its `end` event: the server went away mid-stream."""


@dataclass
class Board:
    """The live bar: step/total, epoch, train and valid loss, tokens/s, ETA."""

    console: Console
    progress: Progress = field(init=False)
    task: TaskID = field(init=False)
    metrics: dict[str, Any] = field(default_factory=dict)
    estimated_finish: int | None = None

    def __post_init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
        )
        self.task = self.progress.add_task("queued", total=None, stats="")

    def show_job(self, job: JobRead) -> None:
        self.estimated_finish = job.estimated_finish
        self.progress.update(
            self.task,
            description=job.status,
            total=job.steps_planned,
            completed=job.steps_completed or 0,
            stats=self._stats(),
        )

    def show_event(self, event: EventRead) -> None:
        data = event.data or {}
        if event.type == "metrics":
            self.metrics = data
            self.progress.update(
                self.task,
                description="running",
                total=data.get("total_steps"),
                completed=data.get("step", 0),
                stats=self._stats(),
            )
        elif event.level != "info" or not event.message.startswith("Checkpoint created"):
            self.note(f"[dim]{event.message}[/dim]")

    def note(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def _stats(self) -> str:
        parts = []
        m = self.metrics
        if m.get("epoch") is not None:
            parts.append(f"epoch {m['epoch']}")
        for key, name in (("train_loss", "loss"), ("valid_loss", "valid")):
            if m.get(key) is not None:
                parts.append(f"{name} {m[key]:.4f}")
        if m.get("tokens_per_second") is not None:
            parts.append(f"{m['tokens_per_second']:.0f} tok/s")
        if self.estimated_finish is not None:
            left = max(0, self.estimated_finish - int(time.time()))
            parts.append(f"ETA {left // 60}:{left % 60:02d}")
        return "  ".join(parts)


@dataclass
class Watch:
    api: Api
    job_id: str
    board: Board
    reconnect_seconds: float
    last_event_id: str | None = None
    job_read_at: float = 0.0

    def run(self) -> JobRead:
        """Follow the job to its end; the ended job."""
        job = self.read_job()
        down_since: float | None = None
        backoff = FIRST_BACKOFF_SECONDS
        while job.status not in TERMINAL_JOB_STATUSES:
            try:
                job = self.follow()
            except (httpx.TransportError, StreamDropped, _ServerError) as exc:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.reconnect_seconds:
                    raise ConnectionError(
                        f"lost the server for {self.reconnect_seconds:.0f} s"
                    ) from exc
                self.board.note(
                    f"[yellow]stream lost ({_why(exc)}); reconnecting in {backoff:.1f} s[/yellow]"
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                try:
                    job = self.read_job()
                except (httpx.TransportError, _ServerError):
                    continue
            down_since, backoff = None, FIRST_BACKOFF_SECONDS
        self.board.show_job(job)
        return job

    def follow(self) -> JobRead:
        """One stream, from after the last event seen to the job's end."""
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        try:
            for kind, event_id, data in self.api.server_sent(
                "GET",
                f"/fine_tuning/jobs/{self.job_id}/events",
                params={"stream": "true"},
                headers=headers,
            ):
                if kind == "end":
                    return JobRead.model_validate_json(data)
                if kind == "error":  # the server ended the stream for a reason (a revoked key)
                    raise ApiError(400, json.loads(data))
                self.last_event_id = event_id or self.last_event_id
                event = EventRead.model_validate_json(data)
                self.board.show_event(event)
                # a status change (paused, resumed, retried) comes as a plain event: show it
                stale = time.monotonic() - self.job_read_at > JOB_REFRESH_SECONDS
                if event.type != "metrics" or stale:
                    self.read_job()
        except ApiError as exc:
            if exc.status >= 500:  # the server (or its database) is coming back: retry
                raise _ServerError(exc.message) from exc
            raise
        raise StreamDropped("the stream ended before the job")

    def read_job(self) -> JobRead:
        try:
            job = JobRead.model_validate(self.api.call("GET", f"/fine_tuning/jobs/{self.job_id}"))
        except ApiError as exc:
            if exc.status >= 500:
                raise _ServerError(exc.message) from exc
            raise
        self.job_read_at = time.monotonic()
        self.board.show_job(job)
        return job


class _ServerError(Exception):
    """A 5xx answer while watching: the server is restarting or its database is away."""


def _why(exc: Exception) -> str:
    return type(exc).__name__ if not str(exc) else str(exc)[:120]


def watch_job(api: Api, job_id: str, *, console: Console, reconnect_seconds: float) -> JobRead:
    """Show the job's live bar until it ends; the ended job."""
    board = Board(console=console)
    with board.progress:
        return Watch(api, job_id, board, reconnect_seconds).run()


def exit_code(job: JobRead) -> int:
    """0 succeeded, 1 failed, 2 cancelled."""
    return EXIT_CODES[JobStatus(job.status)]
