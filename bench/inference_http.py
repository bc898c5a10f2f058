"""Benchmark 5: our engine vs the naive baseline through the HTTP API (target >= 3x).

Two uvicorn servers in this process run the very same app (routes, auth, registry, SQLite);
they differ only in `app.state.engine`: ours (batching scheduler) or the naive baseline
(one PEFT model, `set_adapter` per request, one request at a time — how teams serve LoRA
with plain PEFT). 8 concurrent clients, each on its own adapter (8 adapters), send greedy
/v1/completions; rounds alternate between the servers. Run: python -m bench.inference_http
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

from app import migrate, registry, tenancy
from app.config import Settings, get_settings
from app.db.models import Job
from app.db.session import session_scope
from app.ids import new_id
from app.inference import Generation, InferenceEngine
from app.main import create_app
from app.ml.loading import load_base_model, load_tokenizer
from app.storage import ArtifactStore
from bench.inference_common import build_adapters, build_base, median
from tests.e2e.stack import free_port

CLIENTS, PER_CLIENT, MAX_TOKENS = 8, 2, 16


class _Done:
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def result(self) -> Generation:
        return self.generation


class NaiveEngine:
    """The baseline: one PeftModel, `set_adapter` per request, requests one at a time."""

    def __init__(self, base: Path) -> None:
        self.base_model = load_base_model(base, device="cpu")
        self.tokenizer = load_tokenizer(base)
        self.model = None
        self.names: dict[str, str] = {}
        self.lock = threading.Lock()

    def submit(self, *, adapter, prompt, max_tokens, **_: object) -> _Done:  # type: ignore[no-untyped-def]
        import peft

        with self.lock:
            if adapter.id not in self.names:
                name = self.names[adapter.id] = f"a{len(self.names)}"
                if self.model is None:
                    self.model = peft.PeftModel.from_pretrained(
                        self.base_model, str(adapter.path), adapter_name=name
                    ).eval()
                else:
                    self.model.load_adapter(str(adapter.path), adapter_name=name)
            self.model.set_adapter(self.names[adapter.id])
            ids = torch.tensor([self.tokenizer(prompt).input_ids])
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return _Done(Generation(text, "length", ids.shape[1], len(out)))


def publish(settings: Settings, refs: list) -> tuple[str, list[str]]:  # type: ignore[type-arg]
    """Register the adapters (copied into the store) for one organization; key and ids."""
    store = ArtifactStore(settings.artifacts_dir)
    ids = []
    with session_scope(settings.sqlalchemy_url) as session:
        org = tenancy.get_or_create_organization(session, name="bench")
        key = tenancy.create_api_key(session, organization=org)
        for index, ref in enumerate(refs):
            job = Job(
                id=new_id("ftjob"),
                organization_id=org.id,
                model="bench",
                training_file="file-x",
                hyperparameters={},
                seed=0,
                status="succeeded",
            )
            session.add(job)
            session.flush()
            store.publish_dir(ref.path, f"adapters/{job.id}")
            adapter_id = registry.adapter_name(
                base_model="bench", organization="bench", suffix=f"a{index}", job_id=job.id
            )
            registry.register_adapter(
                session,
                adapter_id=adapter_id,
                organization_id=org.id,
                base_model="bench",
                job_id=job.id,
                storage_key=f"adapters/{job.id}",
                sha256=ref.sha256,
                size_bytes=1,
                lora_config={},
            )
            ids.append(adapter_id)
    return key, ids


def serve(settings: Settings, engine: object) -> tuple[str, uvicorn.Server]:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    app.state.engine = engine
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def run_round(url: str, key: str, models: list[str]) -> tuple[float, float]:
    """8 clients, each sending PER_CLIENT requests on its adapter: completion tokens per
    wall second and per CPU second of this process (servers, engines and clients)."""

    def client(model: str) -> int:
        tokens = 0
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        ) as http:
            for _ in range(PER_CLIENT):
                response = http.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": "The quick brown fox",
                        "temperature": 0,
                        "max_tokens": MAX_TOKENS,
                    },
                )
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(client, models))
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lf-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_base(args.root)
    refs = build_adapters(base, args.root, CLIENTS)
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            data_dir=Path(data),
            base_models={"bench": str(base)},
            device="cpu",
            sweep_interval_seconds=0,
            rate_limit_per_second=1e6,
            rate_limit_burst=10**6,
        )
        migrate.upgrade(settings)
        key, models = publish(settings, refs)
        ours = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=8)
        servers = {"ours": serve(settings, ours), "naive PEFT": serve(settings, NaiveEngine(base))}
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for round_index in range(args.rounds + 1):  # round 0 warms up (loads adapters)
            for name, (url, _) in servers.items():
                wall, cpu = run_round(url, key, models)
                if round_index:
                    rates[name].append((wall, cpu))
                print(f"   round {round_index} {name}: {wall:.1f} tokens/s, {cpu:.1f} per CPU s")
        for _, server in servers.values():
            server.should_exit = True
        ours.close()
    print(
        f"--- {CLIENTS} clients x {PER_CLIENT} requests x {MAX_TOKENS} tokens, "
        f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds ---"
    )
    wall = {name: median([w for w, _ in values]) for name, values in rates.items()}
    cpu = {name: median([c for _, c in values]) for name, values in rates.items()}
    for name in rates:
        print(f"   {name}: {wall[name]:.1f} tokens/s, {cpu[name]:.1f} tokens per CPU second")
    print(
        f"5. engine / naive PEFT throughput over HTTP: {wall['ours'] / wall['naive PEFT']:.2f}x"
        f" (per CPU second: {cpu['ours'] / cpu['naive PEFT']:.2f}x)"
    )


if __name__ == "__main__":
    main()
