"""Function-calling data as training sees it: rendered through the chat template's `tools`,
the loss on exactly the assistant's tool calls and replies (token by token), `weight`
respected, and a base whose template drops tool calls refused before anything trains."""

from __future__ import annotations

import json

import pytest

from app.errors import JobInputError
from app.ml.tiny_model import build_tokenizer
from app.ml.tool_support import tool_calling_refusal
from tests.chat_families import FAMILIES
from tests.tool_data import weather_example, weather_preference
from worker.job_inputs import check_tool_calling
from worker.training.data import IGNORE_INDEX, encode_record

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
[QWEN] = [f for f in FAMILIES if f.name == "chatml_qwen"]
[LLAMA3] = [f for f in FAMILIES if f.name == "llama3"]
TEMPLATES = {  # tokenizer, and how its template ends an assistant turn
    "fallback": (build_tokenizer, "<|end|>"),
    "chatml_qwen": (QWEN.tokenizer, "<|im_end|>\n"),
}


def as_template_takes_it(example: dict) -> list[dict]:
    """The messages with each call's arguments as a mapping (Hugging Face's convention)."""
    messages = json.loads(json.dumps(example["messages"]))
    for m in messages:
        for c in m.get("tool_calls") or ():
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return messages


def expected_labels(tok, example: dict, trained: list[str]) -> tuple[list[int], list[int]]:
    """The ids of the template's own render, and labels on exactly the `trained` texts."""
    full = tok.apply_chat_template(
        as_template_takes_it(example), tools=example["tools"], tokenize=False
    )
    input_ids, labels, done = [], [], 0
    for text in trained:
        start = full.index(text, done)
        before = tok(full[done:start], add_special_tokens=False).input_ids
        reply = tok(text, add_special_tokens=False).input_ids
        input_ids += before + reply
        labels += [IGNORE_INDEX] * len(before) + reply
        done = start + len(text)
    rest = tok(full[done:], add_special_tokens=False).input_ids
    return input_ids + rest, labels + [IGNORE_INDEX] * len(rest)


@pytest.mark.parametrize("name", TEMPLATES)
def test_loss_on_the_tool_call_and_the_reply_token_by_token(name: str) -> None:
    build, end = TEMPLATES[name]
    tok = build()
    example = weather_example("Paris")
    [encoded] = encode_record(tok, example, max_seq_length=4096)
    input_ids, labels = expected_labels(tok, example, [CALL + end, "18C in Paris." + end])
    assert encoded.input_ids == input_ids
    assert encoded.labels == labels
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = tok.decode(encoded.input_ids[:first_trained])
    assert '"description": "Weather in a city"' in prompt  # the tools are shown


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_tool_call_with_weight_0_is_shown_but_not_trained(name: str) -> None:
    build, end = TEMPLATES[name]
    tok = build()
    example = weather_example("Paris", weight=0)
    [encoded] = encode_record(tok, example, max_seq_length=4096)
    assert (encoded.input_ids, encoded.labels) == expected_labels(
        tok, example, ["18C in Paris." + end]
    )
    assert CALL in tok.decode(encoded.input_ids)


def test_templates_are_probed_for_tool_calls() -> None:
    assert tool_calling_refusal(build_tokenizer()) is None  # the documented fallback
    assert tool_calling_refusal(QWEN.tokenizer()) is None
    refusal = tool_calling_refusal(LLAMA3.tokenizer())
    assert refusal is not None and "does not render" in refusal and "tool_calls" in refusal


def test_a_base_that_drops_tool_calls_fails_the_job_naming_why() -> None:
    tok = LLAMA3.tokenizer()
    check_tool_calling(tok, [{"messages": [{"role": "user", "content": "hi"}]}], "training_file")
    with pytest.raises(JobInputError) as info:
        check_tool_calling(tok, [weather_example("Paris")], "validation_file")
    assert info.value.error["code"] == "unsupported_tool_calls"
    assert info.value.error["param"] == "validation_file"
    assert "chat template does not render" in info.value.error["message"]


@pytest.mark.parametrize(
    ("method", "row"),
    [("supervised", weather_example("Paris")), ("dpo", weather_preference("Paris"))],
)
def test_a_job_on_tool_data_fails_before_training_on_such_a_base(tmp_path, method, row) -> None:
    from app import migrate
    from app.db.models import Job
    from app.ml.tiny_model import build_tiny_model
    from tests.conftest import make_settings
    from tests.factories import load, submit
    from worker.run_job import run_job

    base_dir = build_tiny_model(tmp_path / "base", tokenizer=LLAMA3.tokenizer())
    settings = make_settings(tmp_path / "data", base_dir, base_models={"llama3": str(base_dir)})
    migrate.upgrade(settings)
    job_id = submit(settings, rows=[row] * 3, model="llama3", method=method)
    assert run_job(job_id, settings=settings) == "failed"
    [job] = load(settings, Job, id=job_id)
    assert job.error["code"] == "unsupported_tool_calls", job.error
    assert job.error["param"] == "training_file"
    assert "does not render the tools" in job.error["message"]
    assert job.trained_tokens in (None, 0)  # not one step ran
