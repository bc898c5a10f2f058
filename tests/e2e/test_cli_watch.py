"""`loraforge jobs create … --watch` as a user runs it, against the real stack, across an API
restart: the watch reconnects, resumes after the last event it saw, and ends with the model."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.stack import cli, free_port, running, stack_env, tail_logs
from tests.factories import chat_rows, jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_create_watch_trains_to_the_end_across_an_api_restart(tmp_path, tiny_model_dir) -> None:
    port = free_port()
    env = stack_env(tmp_path / "data", tiny_model_dir)
    cli(env, "db", "upgrade")
    key = cli(env, "keys", "create", "--org", "acme").strip()
    dataset = tmp_path / "train.jsonl"
    dataset.write_bytes(jsonl(chat_rows(6)))
    base_url = f"http://127.0.0.1:{port}"
    client_env = env | {"LORAFORGE_BASE_URL": base_url, "LORAFORGE_API_KEY": key}
    api = ["api", "--port", str(port)]
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    command = ["jobs", "create", "--model", "tiny", "--file", str(dataset), "--suffix", "watched"]
    hp = ["--hp", "n_epochs=2", "--hp", "batch_size=3", "--hp", "learning_rate=1e-3"]
    watcher = None
    try:
        # No worker yet: the job stays queued while the watch follows its stream.
        with running([api], env, tmp_path / "logs-before", port):
            with out.open("w") as stdout, err.open("w") as stderr:
                watcher = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", *command, *hp, "--watch"],
                    env=client_env,
                    stdout=stdout,
                    stderr=stderr,
                    text=True,
                )
            seen = wait_for(lambda: "Created fine-tuning job" in err.read_text(), "the stream")
            assert seen and watcher.poll() is None, err.read_text()
        # The API is down (its open stream ended at shutdown): the watch retries until it is back.
        wait_for(lambda: "stream lost" in err.read_text(), "the watch to notice")
        with running([api, ["worker"]], env, tmp_path / "logs-after", port):
            code = watcher.wait(timeout=300)
            jobs = httpx.get(
                f"{base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"}
            ).json()["data"]
            logs = tail_logs(tmp_path / "logs-after")
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
    shown = err.read_text()
    assert code == 0, shown + logs
    (job,) = jobs
    steps = f"{job['steps_planned']}/{job['steps_planned']}"
    assert "stream lost" in shown and steps in shown and "tok/s" in shown  # the bar at its end
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft:tiny:acme:")
    assert out.read_text().strip().splitlines()[-1] == job["fine_tuned_model"]
    # resumed after the last event seen: nothing shown twice
    assert shown.count(f"Created fine-tuning job: {job['id']}") == 1, shown
    assert out.read_text().count(job["fine_tuned_model"]) == 1
