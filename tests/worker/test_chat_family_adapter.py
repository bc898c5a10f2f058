"""An adapter trained on multi-turn chat data in each family's format answers through the
engine (issue 15, §3); with Qwen 3's, whose history drops earlier reasoning, each record
trains as one example per assistant turn. The tiny model carries the family's tokenizer and
template, saved next to it as a hub model's are. The data's tokens and labels are checked
token by token in test_chat_families.py."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from app.inference import AdapterRef, InferenceEngine  # noqa: E402
from app.jobs.hyperparameters import resolve  # noqa: E402
from app.ml.adapters import ADAPTER_WEIGHTS  # noqa: E402
from app.ml.loading import load_base_model, load_tokenizer  # noqa: E402
from app.ml.tiny_model import build_tiny_model  # noqa: E402
from app.schemas.jobs import Hyperparameters  # noqa: E402
from app.storage import file_sha256  # noqa: E402
from tests.chat_families import FAMILIES, Family  # noqa: E402
from worker.training.data import encode_dataset  # noqa: E402
from worker.training.loop import train_lora  # noqa: E402

ANSWERS = ["K7", "B2", "Z9"]
RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"item {i}?"},
            {"role": "assistant", "content": f"<think>\nlook {i}\n</think>\n\nok"},
            {"role": "user", "content": "code?"},
            {"role": "assistant", "content": f"<think>\nitem {i}\n</think>\n\n{answer}"},
        ]
    }
    for i, answer in enumerate(ANSWERS)
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_adapter_trained_on_multi_turn_chats_answers(family: Family, tmp_path: Path) -> None:
    base_dir = build_tiny_model(tmp_path / "base", tokenizer=family.tokenizer())
    tokenizer = load_tokenizer(base_dir)
    assert tokenizer.chat_template == family.template  # saved next to the model
    examples = encode_dataset(tokenizer, RECORDS, max_seq_length=160)
    per_turn = family.name == "qwen3"  # its history drops the earlier reasoning
    assert len(examples) == (2 if per_turn else 1) * len(RECORDS)
    asked = Hyperparameters(n_epochs=30, batch_size=2, learning_rate=1e-2, lora_r=16, packing=False)
    hp = resolve(asked, n_examples=len(examples), seed=0)
    train_lora(
        model=load_base_model(base_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=[],
        hyperparameters=hp,
        out_dir=tmp_path / "adapter",
    )
    folder = tmp_path / "adapter"
    ref = AdapterRef(f"ft:{family.name}", folder, file_sha256(folder / ADAPTER_WEIGHTS))
    engine = InferenceEngine(base_models={"tiny": str(base_dir)}, device="cpu")
    try:
        # the history as inference sends it: the earlier reasoning is dropped by the template
        history = RECORDS[0]["messages"][:3]
        common = {"base_model": "tiny", "messages": history, "max_tokens": 40, "temperature": 0}
        answer = engine.generate(adapter=ref, **common)
        base = engine.generate(adapter=None, **common)
    finally:
        engine.close()
    # every trained reply opens with the reasoning block (after Mistral's space): the adapter
    # answers that way, the random base does not (memorising the codes takes longer than a
    # test should)
    assert answer.text.removeprefix(" ").startswith("<think>\n"), answer.text
    assert not base.text.startswith("<think>"), base.text


def test_the_examples_bound_counts_the_turns_a_template_trains(tmp_path: Path) -> None:
    """The API counts a file's lines (3 here: 2 epochs * 3 = 6 fit a bound of 8); Qwen 3's
    template trains each record as one example per assistant turn (2 * 6 = 12), so the
    worker fails the job before training, naming the bound, instead of running past it."""
    from app import migrate
    from app.db.models import Job
    from tests.conftest import make_settings
    from tests.factories import load, submit
    from worker.run_job import run_job

    [qwen3] = [family for family in FAMILIES if family.name == "qwen3"]
    base_dir = build_tiny_model(tmp_path / "base", tokenizer=qwen3.tokenizer())
    settings = make_settings(
        tmp_path / "data", base_dir, max_examples_per_job=8, base_models={"qwen3": str(base_dir)}
    )
    migrate.upgrade(settings)
    job_id = submit(settings, rows=RECORDS, model="qwen3", n_epochs=2, batch_size=2)
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "too_many_examples", job.error
    assert "2 * 6 = 12 examples" in job.error["message"]
    assert job.error["param"] == "hyperparameters.n_epochs"
