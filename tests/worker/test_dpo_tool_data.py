"""Preference pairs with function calling: each answer rendered with the input's tools as a
supervised example is, the loss (so the chosen and rejected log-probabilities) on the
answer's tool call and nothing before it; a DPO job on such pairs trains."""

from __future__ import annotations

import pytest

from app.db.models import Job
from app.ml.tiny_model import build_tokenizer
from tests.factories import load, submit
from tests.tool_data import weather_preference
from worker.run_job import run_job
from worker.training.data import IGNORE_INDEX
from worker.training.preference_data import encode_preferences


def rendered_call(city: str) -> str:  # the fallback template's Hermes layout
    return (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
    )


def test_both_answers_are_their_rendered_tool_calls_after_the_tools() -> None:
    tok = build_tokenizer()
    chosen, rejected = encode_preferences(tok, [weather_preference("Paris")], max_seq_length=512)
    for example, city in ((chosen, "Paris"), (rejected, "Rome")):
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert all(label != IGNORE_INDEX for label in example.labels[first:])
        assert example.labels[first:] == example.input_ids[first:]
        prompt, answer = (
            tok.decode(ids) for ids in (example.input_ids[:first], example.labels[first:])
        )
        assert '"description": "Weather in a city"' in prompt  # the tools are shown
        assert prompt.endswith("<|assistant|>") and rendered_call(city) not in prompt
        assert answer.startswith(rendered_call(city))  # then the turn's end and EOS


@pytest.mark.slow
def test_a_dpo_job_on_tool_calling_pairs_succeeds(settings) -> None:
    rows = [
        weather_preference(city, other) for city, other in (("Paris", "Rome"), ("Oslo", "Lima"))
    ]
    job_id = submit(settings, method="dpo", rows=rows * 2, n_epochs=1, batch_size=2)
    assert run_job(job_id, settings=settings) == "succeeded"
    [job] = load(settings, Job, id=job_id)
    assert job.trained_tokens and job.trained_tokens > 0
