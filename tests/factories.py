"""Test data made the way users make it: one home for what several test modules need.

With a test client, bodies (`chat_rows`, `jsonl`) go through the API: `upload`,
`uploaded_file`, `create_job`, `complete`. Without one (the worker's tests), `store_dataset`
stores a dataset with the function POST /v1/files stores it with, and `submit` creates a job
with the one POST /v1/fine_tuning/jobs calls. `publish_adapter` publishes an adapter the way
a finished job does. Test modules import helpers from here (or from a helper module beside
them), never from each other: tests/unit/test_import_rules.py checks it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import tenancy
from app.config import Settings, get_settings
from app.db.base import utcnow
from app.db.models import Adapter, Checkpoint, File, Job, JobEvent, Organization
from app.db.session import session_scope
from app.files import service as files
from app.ids import new_id
from app.jobs import service as jobs
from app.main import create_app
from app.ml.adapters import ADAPTER_WEIGHTS, save_adapter
from app.ml.loading import load_base_model
from app.quantization import BACKEND
from app.registry import service as registry
from app.schemas.jobs import JobCreate
from app.storage import ArtifactStore, LocalStore, open_store

PROMPT = "The quick brown fox"  # what `complete` sends unless told otherwise


def chat_rows(n: int = 12) -> list[dict]:
    """`n` chat examples, each a question and a short answer the tiny model can learn."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"code for item {i}?"},
                {"role": "assistant", "content": f"K{i}-Q"},
            ]
        }
        for i in range(n)
    ]


def preference_rows(n: int = 12) -> list[dict]:
    """`n` preference (DPO) examples in OpenAI's shape: a question, a preferred short answer
    and a rejected one."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"code for item {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"K{i}-Q"}],
            "non_preferred_output": [{"role": "assistant", "content": f"no {i}"}],
        }
        for i in range(n)
    ]


def ask_tiny(engine, *, owner: str | None, prompt: str, max_tokens: int):
    """A greedy completion on the tiny base model, submitted to `engine` (not awaited)."""
    return engine.submit(
        base_model="tiny",
        adapter=None,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        owner=owner,
    )


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def api_app(settings: Settings, role: str = "api"):
    """The app of `role` over `settings`, as `loraforge api` (or `serve`) builds it."""
    app = create_app(settings, role=role)
    app.dependency_overrides[get_settings] = lambda: settings
    return app


def api_client(settings: Settings):
    """A TestClient of the app on `settings`, signed in as a new key of organization acme."""
    from fastapi.testclient import TestClient

    client = TestClient(api_app(settings))
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name="acme")
        client.headers["Authorization"] = (
            f"Bearer {tenancy.create_api_key(session, organization=organization)}"
        )
    return client


def upload(client, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    """POST /v1/files; the response, whatever it says."""
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


def uploaded_file(client, n: int = 5, name: str = "train.jsonl") -> str:
    """Upload `n` chat examples; the new file's id."""
    response = upload(client, jsonl(chat_rows(n)), name=name)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client, **body):
    """POST /v1/fine_tuning/jobs; the response, whatever it says."""
    return client.post("/v1/fine_tuning/jobs", json=body)


def complete(client, **body):
    """POST /v1/completions, greedy, on `PROMPT` unless `body` says otherwise."""
    return client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0} | body)


def store_dataset(
    session: Session,
    *,
    organization: Organization,
    store: ArtifactStore,
    content: bytes,
    filename: str = "t.jsonl",
    max_lines: int = 1000,
    max_stored_bytes: int = 0,
) -> File:
    """Store `content` as POST /v1/files does, in `session`: the name and purpose are checked,
    then the spooled body is stored."""
    files.check_upload(filename=filename, purpose="fine-tune")
    with store.temp_dir() as tmp:
        spool = tmp / "upload.jsonl"
        spool.write_bytes(content)
        staged = files.stage_upload(
            spool=spool, size=len(content), sha256=hashlib.sha256(content).hexdigest(),
            filename=filename, purpose="fine-tune", store=store, max_lines=max_lines,
        )  # fmt: skip
    try:
        return files.add_file_row(
            session, organization=organization, staged=staged, max_stored_bytes=max_stored_bytes
        )
    except Exception:
        store.delete(staged.storage_key)
        raise


def submit(
    settings,
    *,
    rows=None,
    org="acme",
    model="tiny",
    validation_rows=None,
    method="supervised",
    **hyperparameters,
) -> str:
    """A queued job of organization `org` on `rows` (6 chat examples, or for method "dpo" 6
    preference pairs), validated on `validation_rows` if given; its id.

    Small, fast hyperparameters unless given; nothing is enqueued (the test runs the job).
    """
    hp = {"n_epochs": 2, "batch_size": 3, "learning_rate": 1e-3, "packing": False}
    store = open_store(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name=org)
        default_rows = preference_rows(6) if method == "dpo" else chat_rows(6)
        content = jsonl(rows or default_rows)
        row = store_dataset(session, organization=organization, store=store, content=content)
        validation = None
        if validation_rows is not None:
            content = jsonl(validation_rows)
            validation = store_dataset(
                session, organization=organization, store=store, content=content
            ).id
        request = JobCreate(
            model=model,
            training_file=row.id,
            validation_file=validation,
            suffix="demo",
            seed=3,
            method={"type": method, method: {"hyperparameters": hp | hyperparameters}},
        )
        job = jobs.create_job(
            session, organization=organization, request=request, base_models=settings.base_models
        )
        return job.id


def load(settings, model, **where):
    """Every row of `model` matching `where` (column=value)."""
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(model).filter_by(**where)))


def job_count(settings) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def stored_nothing(settings) -> bool:
    """No file row, no stored dataset and no spool left behind."""
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.scalar(select(func.count()).select_from(File))
    datasets = settings.artifacts_dir / "datasets"
    leftovers = list((settings.artifacts_dir / "tmp").iterdir())
    return rows == 0 and not (datasets.exists() and any(datasets.iterdir())) and not leftovers


def random_lora(model_dir: Path, *, seed: int, rank: int = 4):
    """A PEFT model over the tiny base with random (non-zero) LoRA factors."""
    import peft  # here, not above: modules without torch import this one too
    import torch

    torch.manual_seed(seed)
    return peft.get_peft_model(
        load_base_model(model_dir, device="cpu"),
        peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj"],
        ),
    )


def publish_adapter(
    settings, model_dir: Path, *, org: str, suffix: str, seed: int, rank: int = 4
) -> str:
    """Write a random-B LoRA for the tiny base into the store and register it; its id."""
    model = random_lora(model_dir, seed=seed, rank=rank)
    store = open_store(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name=org)
        job = Job(
            id=new_id("ftjob"),
            organization_id=organization.id,
            model="tiny",
            training_file="file-x",
            hyperparameters={},
            seed=seed,
            status="succeeded",
        )
        session.add(job)
        session.flush()
        key = f"adapters/{job.id}"
        with store.temp_dir() as tmp:
            sha = save_adapter(model, tmp)
            store.publish_dir(tmp, key)
        adapter_id = registry.adapter_name(
            base_model="tiny", organization=org, suffix=suffix, job_id=job.id
        )
        registry.register_adapter(
            session,
            adapter_id=adapter_id,
            organization_id=organization.id,
            base_model="tiny",
            job_id=job.id,
            storage_key=key,
            sha256=sha,
            size_bytes=1,
            lora_config={"r": rank},
        )
        job.fine_tuned_model = adapter_id
    return adapter_id


def publish_checkpoint(settings, model_dir, adapter_id: str, *, step: int, seed: int) -> str:
    """Store and record a checkpoint of the adapter's job the way the worker does; its id."""
    store = open_store(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        adapter = session.get_one(Adapter, adapter_id)
        key = f"checkpoints/{adapter.job_id}/step-{step}"
        with store.temp_dir() as tmp:
            sha = save_adapter(random_lora(model_dir, seed=seed), tmp)
            store.publish_dir(tmp, key)
        name = registry.checkpoint_name(adapter_id, step)
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=adapter.job_id,
                organization_id=adapter.organization_id,
                step_number=step,
                fine_tuned_model_checkpoint=name,
                metrics={"step": step},
                storage_key=key,
                sha256=sha,
            )
        )
    return name


def commit_fails(_session: Session) -> None:
    """Stands in for `app.db.session.commit` when the database goes away at the commit."""
    raise OperationalError("COMMIT", {}, ConnectionError("the database went away"))


def without_bitsandbytes(monkeypatch) -> None:
    """find_spec answers as on a machine where bitsandbytes is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == BACKEND else real(name, *a)
    )


def job_action(settings, action, job_id: str, org: str = "acme"):
    """`action(session, organization=…, job_id=…)` (a domain function such as
    `pause.pause_job`) as organization `org`; the job's status afterwards."""
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name=org)
        return action(session, organization=organization, job_id=job_id).status


def expire_lease(settings, job_id: str) -> None:
    """The job's lease lapsed: its worker is dead as far as the claim and the sweep know."""
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def weights(settings, job_id: str) -> dict:
    """The tensors of the adapter the job registered (local store)."""
    from safetensors.torch import load_file

    [adapter] = load(settings, Adapter, job_id=job_id)
    return load_file(LocalStore(settings.artifacts_dir).path(adapter.storage_key) / ADAPTER_WEIGHTS)


def messages(settings, job_id: str) -> list[JobEvent]:
    return load(settings, JobEvent, job_id=job_id)


class WorkerDied(BaseException):
    """Escapes run_job's `except Exception` like a killed process: nothing is recorded."""


def die_at(monkeypatch, step: int) -> None:
    """Make the worker's process 'die' as it reports `step` (a kill -9, in process)."""
    from worker import run_job as run_job_module

    real = run_job_module.Progress.on_step

    def on_step(self, report):
        if report.step == step:
            raise WorkerDied
        real(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_step", on_step)
