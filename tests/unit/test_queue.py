"""Sending the wake-up message: an unreachable broker is an outage (False: the sweep
re-sends); a broker URL that can never work, or a bug, is raised instead of being
reported as an outage forever."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from app.jobs import queue
from tests.conftest import make_settings


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], Celery]:
    """Point the queue's client at `broker_url`."""

    def use(broker_url: str) -> Celery:
        client = queue.make_celery(make_settings(tmp_path, tmp_path, broker_url=broker_url))
        client.conf.broker_connection_timeout = 0.5  # kombu retries connecting for 4 s
        monkeypatch.setattr(queue, "_client", lambda: client)
        return client

    return use


def test_a_redis_that_refuses_connections_is_an_outage(broker) -> None:
    broker(f"redis://127.0.0.1:{closed_port()}/0")
    assert queue.enqueue_training("ftjob-x") is False


def test_an_unknown_transport_is_raised_not_taken_for_an_outage(broker) -> None:
    broker("rediss-typo://127.0.0.1:6379/0")
    with pytest.raises(KeyError, match="rediss-typo"):
        queue.enqueue_training("ftjob-x")


def test_a_bug_while_sending_is_raised(broker, monkeypatch: pytest.MonkeyPatch) -> None:
    client = broker(f"redis://127.0.0.1:{closed_port()}/0")

    def send_task(*_args: object, **_kwargs: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(client, "send_task", send_task)
    with pytest.raises(TypeError, match="a bug"):
        queue.enqueue_training("ftjob-x")


def test_a_worker_on_redis_takes_a_message_only_when_a_process_is_free(tmp_path: Path) -> None:
    """Otherwise a busy worker holds the next wake-up while another idles (celery#2788;
    measured by bench/multihost.py: docs/scaling.md)."""
    from celery.app.defaults import find

    settings = make_settings(tmp_path, tmp_path, broker_url="redis://127.0.0.1:6379/15")
    config = queue.celery_config(settings)
    assert config["worker_disable_prefetch"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert find("worker_disable_prefetch")  # a setting this Celery knows, not a no-op key
    # the filesystem broker has no such option (Celery would warn and ignore it)
    assert "worker_disable_prefetch" not in queue.celery_config(make_settings(tmp_path, tmp_path))
