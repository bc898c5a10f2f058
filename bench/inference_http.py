"""Benchmark 5: our engine vs the naive baseline through the HTTP API (target >= 3x).

Two uvicorn servers, each in its own process, run the very same app (routes, auth,
registry, one SQLite database); they differ only in `app.state.engine`: ours (batching
scheduler) or the naive baseline (one PEFT model, `set_adapter` per request, one request at
a time — how teams serve LoRA with plain PEFT). 8 concurrent clients in this process, each
on its own adapter (8 adapters), send greedy /v1/completions; rounds alternate between the
servers. Run: python -m bench.inference_http

Separate server processes, as deployed: with both servers in one process, the baseline's
torch calls from the route threads halved our engine thread's CPU use afterwards (measured:
250 -> 130 tokens/s, 1.9 -> 1.1 cores), an artefact of sharing a process, not of either engine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import torch
import uvicorn

from app import migrate, tenancy
from app.config import Settings, get_settings
from app.db.models import Job
from app.db.session import session_scope
from app.ids import new_id
from app.inference import Generation, InferenceEngine
from app.main import create_app
from app.ml.loading import load_base_model, load_tokenizer
from app.registry import service as registry
from app.storage import LocalStore
from bench.inference_common import build_adapters, build_base, median
from tests.e2e.stack import free_port

CLIENTS, PER_CLIENT, MAX_TOKENS = 8, 2, 16


class _Done:
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def result(self) -> Generation:
        return self.generation

    # what the routes call (app/inference/request.Request): already finished here
    def attach(self) -> None:
        pass

    async def aresult(self) -> Generation:
        return self.generation


class NaiveEngine:
    """The baseline: one PeftModel, `set_adapter` per request, requests one at a time."""

    def __init__(self, base: Path) -> None:
        self.base_model = load_base_model(base, device="cpu")
        self.tokenizer = load_tokenizer(base)
        self.model = None
        self.names: dict[str, str] = {}
        self.lock = threading.Lock()

    def submit(self, *, adapter, prompt, max_tokens, **_: object) -> _Done:
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

    def close(self) -> None:  # the app's shutdown calls it
        pass


def publish(settings: Settings, refs: list) -> tuple[str, list[str]]:
    """Register the adapters (copied into the store) for one organization; key and ids."""
    store = LocalStore(settings.artifacts_dir)
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


def serve(settings: Settings, engine: object, port: int) -> None:
    """Run the app with `engine` on `port` until killed (in a server process)."""
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    app.state.engine = engine
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def start_server(args: argparse.Namespace, data: Path, engine: str) -> tuple[str, subprocess.Popen]:
    """A server process for `engine` ("ours" or "naive"); its URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "bench.inference_http", "--serve", engine]
    command += ["--port", str(port), "--data", str(data), "--root", str(args.root)]
    command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            return url, process
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {engine} server did not start") from None
            time.sleep(0.2)


def bench_settings(data: Path, base: Path) -> Settings:
    return Settings(
        data_dir=data,
        base_models={"bench": str(base)},
        device="cpu",
        sweep_interval_seconds=0,
        rate_limit_per_second=1e6,
        rate_limit_burst=10**6,
    )


def server_main(args: argparse.Namespace) -> None:
    base = build_base(args.root)
    settings = bench_settings(args.data, base)
    if args.serve == "ours":
        engine: object = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=8)
    else:
        engine = NaiveEngine(base)
    serve(settings, engine, args.port)


def run_round(
    http: list[httpx.Client], models: list[str], server: psutil.Process
) -> tuple[float, float]:
    """8 clients, each sending PER_CLIENT requests on its adapter over its own keep-alive
    connection: completion tokens per wall second and per CPU second (server process and
    these clients together)."""

    def client(index: int) -> int:
        tokens = 0
        for _ in range(PER_CLIENT):
            response = http[index].post(
                "/v1/completions",
                json={
                    "model": models[index],
                    "prompt": "The quick brown fox",
                    "temperature": 0,
                    "max_tokens": MAX_TOKENS,
                },
            )
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    def cpu_seconds() -> float:
        times = server.cpu_times()
        return time.process_time() + times.user + times.system

    start, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(client, range(len(models))))
    return tokens / (time.perf_counter() - start), tokens / (cpu_seconds() - cpu)


def clients(url: str, key: str) -> list[httpx.Client]:
    """One client per simulated user, made once: a real client keeps its connection (and
    its TLS context, which httpx builds per client and which costs more than a request)."""
    auth = {"Authorization": f"Bearer {key}"}
    return [httpx.Client(base_url=url, headers=auth, timeout=600) for _ in range(CLIENTS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lf-bench")
    parser.add_argument("--serve", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        server_main(args)
        return
    base = build_base(args.root)
    refs = build_adapters(base, args.root, CLIENTS)
    names = {"ours": "ours", "naive": "naive PEFT"}
    with tempfile.TemporaryDirectory() as data:
        settings = bench_settings(Path(data), base)
        migrate.upgrade(settings)
        key, models = publish(settings, refs)
        servers = {engine: start_server(args, Path(data), engine) for engine in names}
        try:
            http = {engine: clients(url, key) for engine, (url, _) in servers.items()}
            rates: dict[str, list[tuple[float, float]]] = {engine: [] for engine in names}
            for round_index in range(args.rounds + 1):  # round 0 warms up (loads adapters)
                for engine, (_, process) in servers.items():
                    wall, cpu = run_round(http[engine], models, psutil.Process(process.pid))
                    if round_index:
                        rates[engine].append((wall, cpu))
                    print(
                        f"   round {round_index} {names[engine]}: {wall:.1f} tokens/s, "
                        f"{cpu:.1f} per CPU s",
                        flush=True,
                    )
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait(timeout=60)
    print(
        f"--- {CLIENTS} clients x {PER_CLIENT} requests x {MAX_TOKENS} tokens, "
        f"{args.threads} threads per server, medians of {args.rounds} rounds ---"
    )
    wall = {engine: median([w for w, _ in values]) for engine, values in rates.items()}
    cpu = {engine: median([c for _, c in values]) for engine, values in rates.items()}
    for engine in rates:
        print(
            f"   {names[engine]}: {wall[engine]:.1f} tokens/s, "
            f"{cpu[engine]:.1f} tokens per CPU second"
        )
    print(
        f"5. engine / naive PEFT throughput over HTTP: {wall['ours'] / wall['naive']:.2f}x"
        f" (per CPU second: {cpu['ours'] / cpu['naive']:.2f}x)"
    )


if __name__ == "__main__":
    main()
