"""Per-adapter metric labels are bounded (issue 11 §4): the N most used adapters of a
process get series of their own, every other adapter counts under `other`, and no series
ever goes down."""

from __future__ import annotations

import pytest

from app.observability import metrics
from tests.metrics_text import labels_of, samples, value

EVENTS = "loraforge_adapter_cache_events_total"


@pytest.fixture
def bound(monkeypatch) -> int:
    limit = 3
    monkeypatch.setattr(metrics, "adapter_labels", metrics.AdapterLabels(limit))
    return limit


def scrape() -> dict:
    return samples(metrics.exposition(url=None, engine=None).decode())


def test_n_plus_three_adapters_make_n_labels_and_other(bound):
    base = "bound-a"
    adapters = [f"ft:{base}:acme:s:{i}" for i in range(bound + 3)]
    for adapter in adapters:
        metrics.adapter_requested(base, adapter, hit=False)
        metrics.completion_finished(
            base,
            adapter,
            prompt_tokens=2,
            completion_tokens=3,
            submitted_at=0.0,
            first_token_at=None,
        )
    found = scrape()
    labels = labels_of(found, EVENTS, "adapter", base_model=base)
    assert labels == {*adapters[:bound], metrics.OTHER}
    other = {"base_model": base, "adapter": metrics.OTHER}
    assert value(found, "loraforge_inference_requests_total", **other) == 3
    assert value(found, "loraforge_inference_completion_tokens_total", **other) == 9
    total = sum(
        value(found, "loraforge_inference_requests_total", base_model=base, adapter=label)
        for label in labels
    )
    assert total == len(adapters)  # every request counted exactly once


def test_a_hot_adapter_takes_the_least_used_ones_label_and_nothing_goes_down(bound):
    base = "bound-b"
    cold = [f"ft:{base}:acme:cold:{i}" for i in range(bound)]
    for adapter in cold:
        metrics.adapter_requested(base, adapter, hit=True)
    hot = f"ft:{base}:acme:hot:0"
    other = {"base_model": base, "adapter": metrics.OTHER, "event": "hit"}
    seen_other = []
    for _ in range(3):  # past the weakest's one use by more than a quarter
        metrics.adapter_requested(base, hot, hit=True)
        seen_other.append(value(scrape(), EVENTS, **other))
    found = scrape()
    labels = labels_of(found, EVENTS, "adapter", base_model=base)
    assert hot in labels and len(labels - {metrics.OTHER}) == bound
    assert seen_other == [1, 1, 1]  # its first use, before it passed the weakest
    # the second use promoted it: its series starts there; the least used cold adapter
    # (ties: the first name) lost its series, and its later traffic would count as `other`
    assert value(found, EVENTS, base_model=base, adapter=hot, event="hit") == 2
    assert labels == {*cold[1:], hot, metrics.OTHER}


def test_zero_labels_puts_every_adapter_under_other(monkeypatch):
    monkeypatch.setattr(metrics, "adapter_labels", metrics.AdapterLabels(0))
    metrics.adapter_requested("bound-c", "ft:bound-c:acme:s:0", hit=False)
    assert labels_of(scrape(), EVENTS, "adapter", base_model="bound-c") == {metrics.OTHER}


def test_a_database_that_cannot_answer_leaves_out_the_jobs_gauge_only(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'loraforge.db'}"
    found = samples(metrics.exposition(url=url, engine=None).decode())
    assert not labels_of(found, "loraforge_jobs", "status")
    assert ("loraforge_training_steps_total", frozenset()) in found
    assert "could not count jobs" in caplog.text
