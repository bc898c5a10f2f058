"""Experiment tracking (worker/tracking.py): a real tiny job logs its config and loss curve
to W&B (offline mode: the run's .wandb file read back) and MLflow (a local SQLite store
read back with MlflowClient), and a tracker that cannot start never fails the job."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from app import migrate
from app.db.models import JobEvent
from tests.conftest import make_settings
from tests.factories import api_client, create_job, jsonl, load, upload
from worker.run_job import run_job

pytestmark = pytest.mark.slow

HP = {"n_epochs": 2, "batch_size": 3, "learning_rate": 1e-3, "packing": False}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-*.wandb`), parsed with wandb's own protobuf.

    wandb ≥0.2x writes them from its Go core and ships no Python reader; the file is a
    7-byte W&B header, then LevelDB log blocks of 32 KiB: each chunk has a 7-byte header
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) and a record may span blocks.
    """
    from wandb.proto import wandb_internal_pb2

    data, block, records, chunks = path.read_bytes(), 32768, [], []
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wandb_run(tmp_path: Path) -> dict:
    """The one offline run under WANDB_DIR=tmp_path: its run record, config, history, exit."""
    [path] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run: dict = {"history": [], "config": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["project"] = record.run.display_name, record.run.project
            run["tags"] = list(record.run.tags)
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            items = record.history.item  # wandb-core sets nested_key where the key has no "."
            run["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def start_job(settings, integrations: list[dict]) -> str:
    """A job over the API (with a validation file), with `integrations`; its id."""
    client = api_client(settings)
    ids = [
        upload(client, jsonl_rows(n), name=f"{name}.jsonl").json()["id"]
        for name, n in (("train", 6), ("valid", 3))
    ]
    response = create_job(
        client,
        model="tiny",
        training_file=ids[0],
        validation_file=ids[1],
        suffix="tracked",
        seed=3,
        hyperparameters=HP,
        integrations=integrations,
    )
    assert response.status_code in (200, 202), response.text
    assert response.json()["integrations"] == integrations
    return response.json()["id"]


def jsonl_rows(n: int) -> bytes:
    from tests.factories import chat_rows

    return jsonl(chat_rows(n))


def events(settings, job_id: str) -> list[JobEvent]:
    return load(settings, JobEvent, job_id=job_id)


def test_a_job_logs_its_config_and_loss_curve_to_wandb_and_mlflow(
    tmp_path, tiny_model_dir, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays in its files
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # MLflow's local store (its file store is frozen)
    settings = make_settings(tmp_path / "data", tiny_model_dir, mlflow_tracking_uris=[uri])
    migrate.upgrade(settings)
    job_id = start_job(
        settings,
        [
            {"type": "wandb", "wandb": {"project": "lf", "name": "run-1", "tags": ["nightly"]}},
            {"type": "mlflow", "mlflow": {"tracking_uri": uri, "experiment_name": "lf"}},
        ],
    )
    assert run_job(job_id, settings=settings) == "succeeded"
    rows = events(settings, job_id)
    assert [e.message for e in rows if e.level == "warn"] == []
    curve = {e.data["step"]: e.data for e in rows if e.type == "metrics"}  # every step here
    assert len(curve) == 4 and all(m["valid_loss"] is not None for m in curve.values())
    [job] = api_client(settings).get("/v1/fine_tuning/jobs").json()["data"]

    run = wandb_run(tmp_path)
    assert run["name"] == "run-1" and run["project"] == "lf" and run["exit_code"] == 0
    assert {"nightly", f"loraforge/{job_id}", "loraforge/finetune"} <= set(run["tags"])
    assert run["config"]["hyperparameters"] == job["hyperparameters"]
    assert run["config"]["job_id"] == job_id and run["config"]["total_steps"] == 4
    for key in ("train_loss", "valid_loss", "learning_rate", "epoch"):
        logged = {row["_step"]: row[key] for row in run["history"] if key in row}
        assert logged == {step: m[key] for step, m in curve.items()}, key

    mlflow = MlflowClient(tracking_uri=uri)
    [mlflow_run] = mlflow.search_runs([mlflow.get_experiment_by_name("lf").experiment_id])
    assert mlflow_run.info.run_name == job_id and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["hyperparameters.lora_r"] == str(job["hyperparameters"]["lora_r"])
    assert params["base_model"] == "tiny" and params["training_file"] == job["training_file"]
    for key in ("train_loss", "valid_loss", "learning_rate"):
        history = mlflow.get_metric_history(mlflow_run.info.run_id, key)
        assert {m.step: m.value for m in history} == {s: m[key] for s, m in curve.items()}, key


def test_trackers_that_cannot_start_warn_and_the_job_succeeds(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails: extra not installed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = "http://127.0.0.1:9"  # the discard port: nothing listens, the server is down
    settings = make_settings(tmp_path / "data", tiny_model_dir, mlflow_tracking_uris=[down])
    migrate.upgrade(settings)
    job_id = start_job(
        settings,
        [
            {"type": "wandb", "wandb": {"project": "lf"}},
            {"type": "mlflow", "mlflow": {"tracking_uri": down}},
        ],
    )
    assert run_job(job_id, settings=settings) == "succeeded"
    rows = events(settings, job_id)
    warnings = {e.data["integration"]: e.message for e in rows if e.level == "warn"}
    assert set(warnings) == {"wandb", "mlflow"}
    assert "could not start" in warnings["wandb"] and "wandb" in warnings["wandb"]
    assert "training goes on" in warnings["mlflow"]
    assert len([e for e in rows if e.type == "metrics"]) == 4  # trained to the end


def test_the_workers_job_process_logs_to_wandb(tmp_path, tiny_model_dir):
    """The worker's path: in a fresh process (as `loraforge worker` is; this one may hold
    wandb's service from another test, which a forked child must not inherit), the
    supervisor claims the job and trains it in a forked child that logs the W&B run."""
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    migrate.upgrade(settings)
    job_id = start_job(settings, [{"type": "wandb", "wandb": {"project": "lf"}}])
    env = os.environ | {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "LORAFORGE_DATA_DIR": str(settings.data_dir),
        "LORAFORGE_BASE_MODELS": f"tiny={tiny_model_dir}",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_METRICS_EVERY_STEPS": "1",
    }
    code = f"from worker.supervisor import wake; print(wake({job_id!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert f"{job_id}: succeeded" in done.stdout, done.stderr[-2000:]
    metrics = [e.data for e in events(settings, job_id) if e.type == "metrics"]
    run = wandb_run(tmp_path)
    assert run["name"] == job_id and run["exit_code"] == 0
    assert {row["_step"]: row["train_loss"] for row in run["history"]} == {
        m["step"]: m["train_loss"] for m in metrics
    }
