"""The README's quick start trains an adapter that answers (issue 10, defect 8).

Its first example used to leave gibberish on the tiny model (3 epochs at the default
learning rate). This reads the dataset, the hyperparameters, the question and the
expected answer out of README.md, trains them on the model `loraforge tiny-model` builds,
and asks the adapter, greedy, as the README's snippet does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from app.cli.demo import TINY_MODEL_HYPERPARAMETERS
from app.db.models import Adapter, Job
from app.storage import LocalStore
from tests.factories import load, submit
from worker.run_job import run_job

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> dict:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ", 1)]
    dataset = re.search(r"```jsonl\n(.*?)```", section, re.S).group(1)
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    hyperparameters = re.search(r"hyperparameters=(\{.*?\})\)", snippet).group(1)
    question = re.search(r'"content": "([^"]+)"\}\]\)', snippet).group(1)
    answer = re.search(r"print\(reply.*#\s*(.+)", snippet).group(1).strip()
    return {
        "rows": [ast.literal_eval(line) for line in dataset.splitlines() if line.strip()],
        "hyperparameters": ast.literal_eval(hyperparameters),
        "question": question,
        "answer": answer,
        "model_command": "loraforge tiny-model models/tiny" in section,
    }


def test_readme_and_demo_share_the_tiny_model_settings() -> None:
    readme = quick_start()
    assert readme["model_command"]  # the README builds the model this test trains
    assert readme["hyperparameters"] == TINY_MODEL_HYPERPARAMETERS


def test_readme_quick_start_adapter_answers(settings, tiny_model_dir) -> None:
    from app.inference import AdapterRef, InferenceEngine

    readme = quick_start()
    # tiny_model_dir is build_tiny_model's default, what `loraforge tiny-model` writes.
    job_id = submit(
        settings, rows=readme["rows"], **readme["hyperparameters"] | {"packing": "auto"}
    )
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    [adapter] = load(settings, Adapter, job_id=job_id)
    engine = InferenceEngine(base_models={"tiny": str(tiny_model_dir)}, device="cpu")
    try:
        reply = engine.generate(
            base_model="tiny",
            adapter=AdapterRef(
                id=job.fine_tuned_model,
                path=LocalStore(settings.artifacts_dir).path(adapter.storage_key),
                sha256=adapter.sha256,
            ),
            messages=[{"role": "user", "content": readme["question"]}],
            max_tokens=16,
            temperature=0.0,
        )
    finally:
        engine.close()
    assert reply.text == readme["answer"]
