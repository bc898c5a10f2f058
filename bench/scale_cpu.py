"""Llama 3.2 1B's shape on this CPU: peak memory of our training job vs HF Trainer + PEFT,
the QLoRA (nf4) variant's weights, and one answer from the inference engine.

    python -m bench.scale_cpu [--small] [--steps 2] [--threads 2]

A random-init model with Llama 3.2 1B's configuration (hidden 2048, 16 layers, 32 heads /
8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings; 1.24 B parameters, about 4.9 GB
in fp32) is built locally (`bench/llama_shapes.py`) and saved as safetensors. Each variant
then runs in a fresh child process, one at a time (peak RSS only grows within a process):

- ours: a real fine-tuning job (SQLite database, artifact store, `worker.run_job.run_job`)
  on `text` records at `max_seq_length` 2048, packing on, gradient checkpointing on, LoRA
  r=16 on all linear layers, `--steps` optimizer steps of `--batch` examples (its loss takes
  the logits a chunk of tokens at a time: `worker/training/chunked_loss.py`). Whatever the
  worker does before training (its memory planning included, once it has one) runs here
  as it would for a user's job: this bench adds nothing to the path but an observer
  around `app.ml.loading.load_base_model` that reads the RSS before and after the load
  and the class of the loaded base's `q_proj`;
- hf: `transformers.Trainer` + PEFT on the same examples, steps, batch, LoRA shape and
  gradient checkpointing (`bench/hf_baseline.py`; the model's own loss, whole logits);
- nf4: the same job with `quantization="nf4"`. It goes through the worker's path with
  that hyperparameter; the printed Linear class says whether the base really loaded in
  4 bits (`Linear4bit`) or not (`Linear`: the worker does not quantize yet, and the nf4
  ratio is then printed as not measured);
- serve: the inference engine (`app.inference.InferenceEngine`) on the same base answers
  one prompt with the bare base and one with the adapter the `ours` job published.

Figures: peak RSS (VmHWM) of each child; ours / HF (target <= 1.0); the weights share
of nf4 vs fp32 (target <= 0.5): the loaded tensors' bytes (4-bit weights packed, with their
quantization state), with the RSS growth over the load beside it (that also counts the
safetensors file pages the load mapped and touched, which the kernel may drop).
`--small` rehearses everything on a 2-layer model with the same structure in seconds.
Before each full-size child the bench checks MemAvailable against `--min-free-gb`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASE = "scale"  # the allowlist name of the bench's base model
PROMPT = "The quick brown fox"


def status_mb(field: str) -> float:
    """A /proc/self/status memory line in MB: VmHWM (peak RSS: see
    bench.training_throughput.peak_rss_mb for why not ru_maxrss) or VmRSS (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def linear_class(model: Any) -> str:
    """The class of the base's first `q_proj` (torch's Linear, or bitsandbytes' Linear4bit)."""
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            kind = type(module)
            return f"{kind.__module__}.{kind.__qualname__}"
    return "no q_proj"


def weights_mb(model: Any) -> float:
    """The bytes the loaded weights take, counted from the tensors themselves (4-bit
    weights are packed uint8 plus their quantization state): what the base costs, free of
    how the allocator and the safetensors file mapping show up in the RSS."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:  # tied embeddings count once
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        for extra in (getattr(state, "absmax", None), getattr(state, "code", None)):
            if extra is not None:
                total += extra.numel() * extra.element_size()
    return total / 2**20


def loaded_rss(model: Any) -> float:
    """The RSS once every weight is resident. transformers maps safetensors files, so right
    after the load only the pages it touched count (47 MB of a 140 MB model in the
    rehearsal); training and serving touch them all, so touch them here (a sum per
    tensor), then read. A quantized load's weights are anonymous memory already."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    return status_mb("VmRSS")


# -- setup (parent) --------------------------------------------------------------------------


def write_data(path: Path, n: int, lengths: tuple[int, int], seed: int = 0) -> None:
    """`n` text records of random printable characters (one token each with the char
    tokenizer; the record adds BOS and EOS)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,"
    with path.open("w") as out:
        for _ in range(n):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(*lengths)))
            out.write(json.dumps({"text": text}) + "\n")


def settings_of(root: Path, model_dir: Path) -> Any:
    from app.config import Settings

    return Settings(
        data_dir=root / "data", base_models={BASE: str(model_dir)}, device="cpu",
        sweep_interval_seconds=0, metrics_every_steps=1,
    )  # fmt: skip


def create_job(settings: Any, data: Path, hyperparameters: dict[str, Any]) -> str:
    """A queued job as POST /v1/files and POST /v1/fine_tuning/jobs make one."""
    import hashlib

    from app import tenancy
    from app.db.session import session_scope
    from app.files import service as files
    from app.jobs import service as jobs
    from app.schemas.jobs import JobCreate
    from app.storage import open_store

    store = open_store(settings)
    content = data.read_bytes()
    with session_scope(settings.sqlalchemy_url) as session:
        organization = tenancy.get_or_create_organization(session, name="bench")
        files.check_upload(filename=data.name, purpose="fine-tune")
        with store.temp_dir() as tmp:
            spool = tmp / "upload.jsonl"
            spool.write_bytes(content)
            staged = files.stage_upload(
                spool=spool, size=len(content), sha256=hashlib.sha256(content).hexdigest(),
                filename=data.name, purpose="fine-tune", store=store, max_lines=100_000,
            )  # fmt: skip
        row = files.add_file_row(session, organization=organization, staged=staged)
        request = JobCreate(
            model=BASE, training_file=row.id, seed=0, hyperparameters=hyperparameters
        )
        job = jobs.create_job(
            session, organization=organization, request=request, base_models=settings.base_models
        )
        return job.id


# -- children --------------------------------------------------------------------------------


def child_build(model_dir: Path, shape: str) -> dict[str, Any]:
    from bench.llama_shapes import build_llama

    start = time.perf_counter()
    build_llama(model_dir, shape)
    return {"built_s": round(time.perf_counter() - start, 1)}


def observe_loading(seen: dict[str, Any]) -> None:
    """Wrap `app.ml.loading.load_base_model` (the worker imports it at call time) to read
    the RSS around the first load and the class of the loaded Linear layers."""
    import app.ml.loading as loading

    real = loading.load_base_model

    def observed(ref: Any, **kwargs: Any) -> Any:
        before = status_mb("VmRSS")
        model = real(ref, **kwargs)
        if "linear_class" not in seen:
            seen["rss_before_load_mb"] = before
            seen["rss_after_load_mb"] = loaded_rss(model)
            seen["weights_mb"] = weights_mb(model)
            seen["rss_anon_after_load_mb"] = status_mb("RssAnon")
            seen["linear_class"] = linear_class(model)
            seen["load_kwargs"] = {k: str(v) for k, v in kwargs.items()}
        return model

    loading.load_base_model = observed  # type: ignore[assignment]


def child_job(settings: Any, job_id: str) -> dict[str, Any]:
    """Run the queued job through the worker's own in-process path."""
    from app.db.models import Job, JobEvent
    from app.db.session import session_scope
    from worker.run_job import run_job

    seen: dict[str, Any] = {}
    observe_loading(seen)
    start = time.perf_counter()
    outcome = run_job(job_id, settings=settings)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        events = [
            e.message[:160] for e in session.query(JobEvent).filter_by(job_id=job_id)
            if e.type != "metrics"
        ]  # fmt: skip
        hp = job.hyperparameters
        done = {"status": job.status, "error": job.error, "trained_tokens": job.trained_tokens,
                "fine_tuned_model": job.fine_tuned_model}  # fmt: skip
    asked = {k: hp.get(k) for k in ("quantization", "gradient_checkpointing", "packing",
                                     "batch_size", "max_seq_length", "lora_r")}  # fmt: skip
    return {"outcome": str(outcome), "peak_rss_mb": peak, "seconds": round(seconds, 1),
            "hyperparameters": asked, "events": events, **done, **seen}  # fmt: skip


def child_hf(settings: Any, job_id: str, data: Path, model_dir: Path) -> dict[str, Any]:
    """HF Trainer + PEFT on the same examples, steps and batch as job `job_id`."""
    from app.db.models import Job
    from app.db.session import session_scope
    from app.jobs.spec import RunSpec
    from app.ml.loading import load_base_model, load_tokenizer
    from bench.hf_baseline import train_hf_peft
    from worker.training.data import encode_dataset, read_jsonl

    with session_scope(settings.sqlalchemy_url) as session:
        hp = RunSpec.of_job(session.get(Job, job_id)).method.hyperparameters
    tokenizer = load_tokenizer(model_dir)
    examples = encode_dataset(tokenizer, read_jsonl(data), max_seq_length=hp.max_seq_length,
                              train_on_inputs=hp.train_on_inputs)  # fmt: skip
    before = status_mb("VmRSS")
    model = load_base_model(model_dir, device="cpu")
    after, loaded_as, weights = loaded_rss(model), linear_class(model), weights_mb(model)
    start = time.perf_counter()
    stamps = train_hf_peft(
        model, examples, batch_size=hp.batch_size, learning_rate=hp.learning_rate,
        lora_r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, seed=hp.seed,
        gradient_checkpointing=hp.gradient_checkpointing, pad_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return {"peak_rss_mb": status_mb("VmHWM"), "seconds": round(time.perf_counter() - start, 1),
            "steps": len(stamps), "trained_tokens": sum(t for _, t in stamps),
            "rss_before_load_mb": before, "rss_after_load_mb": after,
            "weights_mb": weights, "linear_class": loaded_as}  # fmt: skip


def child_serve(settings: Any, job_id: str, model_dir: Path, max_tokens: int) -> dict[str, Any]:
    """The engine on the same base: one prompt answered by the bare base, one by the
    adapter the `ours` job published."""
    from app.db.models import Job
    from app.db.session import session_scope
    from app.inference import InferenceEngine
    from app.inference.types import AdapterRef
    from app.ml.adapters import ADAPTER_WEIGHTS
    from app.storage import LocalStore, file_sha256

    with session_scope(settings.sqlalchemy_url) as session:
        name = session.get(Job, job_id).fine_tuned_model
    answers: dict[str, Any] = {}
    engine = InferenceEngine(base_models={BASE: str(model_dir)}, device="cpu",
                             max_loaded_adapters=1, max_batch_size=1)  # fmt: skip
    try:
        adapters: list[tuple[str, Any]] = [("base", None)]
        if name:
            path = LocalStore(settings.artifacts_dir).path(f"adapters/{job_id}")
            adapters.append(
                ("adapter", AdapterRef(name, path, file_sha256(path / ADAPTER_WEIGHTS)))
            )
        for label, adapter in adapters:
            start = time.perf_counter()
            got = engine.generate(base_model=BASE, adapter=adapter, prompt=PROMPT,
                                  max_tokens=max_tokens, temperature=0)  # fmt: skip
            answers[label] = {"text": got.text[:40], "completion_tokens": got.completion_tokens,
                              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    finally:
        engine.close()
    return {"peak_rss_mb": status_mb("VmHWM"), "answers": answers}


def run_child(argv: list[str], label: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.scale_cpu", *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-1500:]
        print(f"{label}: child failed (exit {done.returncode}):\n{tail}", flush=True)
        return {"failed": done.returncode}
    result: dict[str, Any] = json.loads(lines[-1])
    if result.get("outcome", "succeeded") != "succeeded":  # say why, from its log
        print(f"{label}: {result['outcome']}; its log ends:\n{done.stderr[-3000:]}", flush=True)
    return result


# -- main ------------------------------------------------------------------------------------


def mb(value: Any) -> str:
    return f"{value:,.0f} MB" if isinstance(value, int | float) else "n/a"


def ratio(a: Any, b: Any) -> str:
    ok = isinstance(a, int | float) and isinstance(b, int | float) and b > 0
    return f"{a / b:.2f}" if ok else "n/a"


def report(shape: str, results: dict[str, dict[str, Any]]) -> None:
    ours, hf, nf4, serve = (results.get(k, {}) for k in ("ours", "hf", "nf4", "serve"))
    print(f"\n== {shape}: peak RSS (VmHWM) per child ==")
    for name, got in (("ours", ours), ("hf", hf), ("nf4", nf4), ("serve", serve)):
        rss_share = (
            got["rss_after_load_mb"] - got["rss_before_load_mb"]
            if "rss_after_load_mb" in got else None
        )  # fmt: skip
        # weights share: the loaded tensors' bytes; the RSS growth over the load is shown
        # beside it (it also holds the safetensors file pages a load maps and touches)
        print(f"{name:6s} peak {mb(got.get('peak_rss_mb'))}; "
              f"weights share {mb(got.get('weights_mb'))} (RSS over the load {mb(rss_share)}); "
              f"Linear {got.get('linear_class', '-')}; {got.get('seconds', '-')} s; "
              f"trained tokens {got.get('trained_tokens', '-')}")  # fmt: skip
    print(
        f"ratio peak RSS ours / HF Trainer + PEFT: "
        f"{ratio(ours.get('peak_rss_mb'), hf.get('peak_rss_mb'))}  (target <= 1.0)"
    )
    quantized = "Linear4bit" in str(nf4.get("linear_class", ""))
    if quantized:
        print(
            f"ratio weights share nf4 / fp32: "
            f"{ratio(nf4.get('weights_mb'), ours.get('weights_mb'))}  (target <= 0.5)"
        )
    else:
        print(
            f"ratio weights share nf4 / fp32: not measured: the nf4 job's base loaded as "
            f"{nf4.get('linear_class', '?')} (not 4-bit); its weights share "
            f"{mb(nf4.get('weights_mb'))} vs {mb(ours.get('weights_mb'))} (target <= 0.5)"
        )
    nf4_peak = ratio(nf4.get("peak_rss_mb"), ours.get("peak_rss_mb"))
    print(f"ratio peak RSS nf4 job / fp32 job: {nf4_peak}{'' if quantized else ' (not quantized)'}")
    for label, got in serve.get("answers", {}).items():
        print(f"engine answer ({label}): {got['completion_tokens']} tokens in {got['seconds']} s, "
              f"{got['text']!r}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a 2-layer model (rehearsal)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per training child")
    parser.add_argument("--batch", type=int, default=2, help="examples per step")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens of the engine's answer")
    parser.add_argument("--only", default="ours,hf,serve,nf4")
    parser.add_argument("--min-free-gb", type=float, default=12.0,
                        help="MemAvailable needed before each full-size child")  # fmt: skip
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--child", choices=["build", "job", "hf", "serve"])
    parser.add_argument("--job")
    args = parser.parse_args()
    shape = "small" if args.small else "1b"
    root = args.root or Path(tempfile.gettempdir()) / f"lf-scale-{shape}"
    model_dir, data = root / "model", root / "train.jsonl"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        settings = settings_of(root, model_dir)
        out = {
            "build": lambda: child_build(model_dir, shape),
            "job": lambda: child_job(settings, args.job),
            "hf": lambda: child_hf(settings, args.job, data, model_dir),
            "serve": lambda: child_serve(settings, args.job, model_dir, args.max_tokens),
        }[args.child]()
        print(json.dumps(out, default=str))
        return 0

    from app import migrate

    print(f"shape {shape}; root {root}; MemAvailable {available_gb():.1f} GiB", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    common = ["--root", str(root), "--threads", str(args.threads)] + (["--small"] * args.small)
    if not (model_dir / "config.json").exists():
        print(f"build: {run_child(['--child', 'build', *common], 'build')}", flush=True)
    # each example about half a row: --batch of them pack into rows of max_seq_length
    half = args.max_seq_length // 2
    write_data(data, args.steps * args.batch, (half - 100, half - 10))
    settings = settings_of(root, model_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings)
    asked = {"n_epochs": 1, "batch_size": args.batch, "learning_rate": 1e-4, "lora_r": 16,
             "lora_alpha": 32, "max_seq_length": args.max_seq_length, "packing": True,
             "gradient_checkpointing": True}  # fmt: skip
    jobs = {"ours": create_job(settings, data, asked),
            "nf4": create_job(settings, data, asked | {"quantization": "nf4"})}  # fmt: skip
    plan = {"ours": ["--child", "job", "--job", jobs["ours"]],
            "hf": ["--child", "hf", "--job", jobs["ours"]],
            "nf4": ["--child", "job", "--job", jobs["nf4"]],
            "serve": ["--child", "serve", "--job", jobs["ours"],
                      "--max-tokens", str(args.max_tokens)]}  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for name in args.only.split(","):
        free = available_gb()
        if not args.small and free < args.min_free_gb:
            print(f"{name}: skipped: MemAvailable {free:.1f} GiB < --min-free-gb "
                  f"{args.min_free_gb}", flush=True)  # fmt: skip
            continue
        results[name] = run_child([*plan[name], *common], name)
        shown = {k: v for k, v in results[name].items() if k != "events"}
        print(f"{name} (MemAvailable before {free:.1f} GiB): {json.dumps(shown, default=str)}",
              flush=True)  # fmt: skip
        for event in results[name].get("events", []):
            print(f"  event: {event}", flush=True)
    report(shape, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
