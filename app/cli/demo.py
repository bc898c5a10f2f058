"""`loraforge demo`: the whole data path on one machine, with no services and no model hub.

Builds a tiny random-init base model, starts `loraforge up` on the embedded default,
creates an API key, and then — as any client would, with the `openai` SDK — uploads a
small chat dataset, fine-tunes an adapter, watches the job, and asks the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from app.statuses import TERMINAL_JOB_STATUSES, JobStatus

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What do bees make?", "Honey."),
    ("What is 2 + 2?", "Four."),
    ("Which planet is red?", "Mars."),
    ("What is frozen water?", "Ice."),
    ("Who wrote Hamlet?", "Shakespeare."),
]
SYSTEM = "Answer in one word."
# What works on `loraforge tiny-model`'s random-init model, which knows no language: many
# passes at a high rate. The README's quick start shows these very values (a test checks that
# they match and that they train its dataset); a real pretrained base wants the defaults.
TINY_MODEL_HYPERPARAMETERS = {"n_epochs": 50, "batch_size": 2, "learning_rate": 3e-3, "lora_r": 16}


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _dataset() -> bytes:
    rows = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
        }
        for q, a in FACTS
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def run_demo(*, port: int = 8765, data_dir: Path | None = None) -> None:
    import openai

    from app.ml.tiny_model import build_tiny_model

    data_dir = data_dir or Path.cwd() / ".loraforge-demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    model_dir = build_tiny_model(data_dir / "models" / "tiny")  # as `loraforge tiny-model` does
    _say(f"built a tiny random-init base model at {model_dir}")
    env = os.environ | {
        "LORAFORGE_DATA_DIR": str(data_dir),
        "LORAFORGE_BASE_MODELS": f"tiny={model_dir}",
        "LORAFORGE_METRICS_EVERY_STEPS": "10",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("LORAFORGE_DATABASE_URL", "LORAFORGE_BROKER_URL"):
        env.pop(key, None)  # the demo runs on the embedded default
    me = [sys.executable, "-m", "app.cli"]
    subprocess.run([*me, "db", "upgrade"], env=env, check=True, capture_output=True)
    api_key = subprocess.run(
        [*me, "keys", "create", "--org", "demo"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    log = open(data_dir / "stack.log", "w")
    stack = subprocess.Popen(
        [*me, "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_health(f"http://127.0.0.1:{port}", stack, data_dir / "stack.log")
        _say(
            f"`loraforge up` is serving on http://127.0.0.1:{port} (log: {data_dir / 'stack.log'})"
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key)
        _fine_tune_and_ask(client)
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
        log.close()


def _fine_tune_and_ask(client: OpenAI) -> None:
    upload = client.files.create(file=("facts.jsonl", _dataset()), purpose="fine-tune")
    _say(f"uploaded {upload.id} ({upload.bytes} bytes, {len(FACTS)} examples)")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload.id,
        suffix="facts",
        seed=0,
        # loraforge's hyperparameters (learning_rate, lora_r) extend the SDK's TypedDict
        hyperparameters=TINY_MODEL_HYPERPARAMETERS,  # type: ignore[arg-type]
    )
    _say(f"created {job.id}: {job.hyperparameters.model_dump()}")
    last_seen = None
    while job.status not in TERMINAL_JOB_STATUSES:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)  # first: the events below reach its state
        fresh = new_events(client, job.id, last_seen)
        for event in fresh:
            last_seen = event.id
            if not event.message.startswith("Checkpoint created"):  # one per epoch: too many
                _say(f"  event: {event.message}")
        if (
            fresh
            and job.status == JobStatus.RUNNING.value
            and getattr(job, "steps_completed", None)
        ):
            _say(f"  progress: {_progress(job)}")
    if job.status != JobStatus.SUCCEEDED.value:
        raise SystemExit(f"[demo] job ended {job.status}: {job.error}")
    fine_tuned = job.fine_tuned_model
    assert fine_tuned is not None  # a succeeded job names its model
    _say(f"fine-tuned model: {fine_tuned}")
    question, expected = FACTS[0]
    for model in ("tiny", fine_tuned):
        reply = client.chat.completions.create(
            model=model,
            temperature=0,
            max_tokens=16,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        )
        _say(f"{model} answers {question!r} with {reply.choices[0].message.content!r}")
    _say(f"(trained answer: {expected!r})")


def new_events(
    client: OpenAI, job_id: str, last_seen: str | None, *, page_size: int = 20
) -> list[FineTuningJobEvent]:
    """The job's events after `last_seen` (None: all of them), oldest first.

    Events list newest first; the SDK's iteration pages back with `after` (the last id of
    each page) until we reach the event seen last, so none is skipped however many came.
    """
    fresh: list[FineTuningJobEvent] = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=page_size):
        if event.id == last_seen:
            break
        fresh.append(event)
    return fresh[::-1]


def _progress(job: FineTuningJob) -> str:
    """The job's progress fields (steps_* are loraforge's own; the SDK keeps extra fields)."""
    finish = job.estimated_finish
    return (
        f"step {getattr(job, 'steps_completed', None)}/{getattr(job, 'steps_planned', None)}, "
        f"{job.trained_tokens} tokens trained, estimated finish "
        + ("unknown" if finish is None else time.strftime("%H:%M:%S", time.localtime(finish)))
    )


def _wait_for_health(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"[demo] the stack exited early; see {log}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"[demo] the API did not come up; see {log}")
