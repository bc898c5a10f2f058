"""One tenant must not stall inference for the others (issue 14, findings 4, 5 and 12).

Organizations take turns into the batch and none holds more than its share of the rows; an
organization past its running + waiting limit is refused (429); a prompt too long for the
context is refused before any tokenizer sees it; tokenizing is never serialised behind one
lock; a tenant sees only its own load.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from pathlib import Path

import pytest

pytest.importorskip("torch")

from app.errors import InvalidRequest, RateLimited
from app.inference import InferenceEngine, prompt_input
from app.inference.fairness import choose_fairly
from tests.factories import ask_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = 1000  # tokens: far longer than the victim's request


def new_engine(tiny_model_dir: Path, **options) -> InferenceEngine:
    return InferenceEngine(base_models={"tiny": str(tiny_model_dir)}, device="cpu", **options)


def ask(engine: InferenceEngine, owner: str, max_tokens: int, prompt: str = "Once upon a time"):
    return ask_tiny(engine, owner=owner, prompt=prompt, max_tokens=max_tokens)


def test_round_robin_takes_one_per_organization_in_turn() -> None:
    ready = {"a": deque(["a1", "a2", "a3", "a4"]), "b": deque(["b1"]), "c": deque(["c1", "c2"])}
    chosen, last = choose_fairly(ready, Counter(), room=5, per_owner=8)
    assert chosen == ["a1", "b1", "c1", "a2", "c2"] and last == "c"
    # the next round starts after the organization served last, and respects the share
    ready = {"a": deque(["a3", "a4"]), "c": deque(["c3"])}
    chosen, _ = choose_fairly(ready, Counter({"a": 2}), room=4, per_owner=3, last_owner="a")
    assert chosen == ["c3", "a3"]


@pytest.mark.usefixtures("no_eos")
def test_a_backlog_of_one_organization_does_not_delay_another(tiny_model_dir: Path) -> None:
    engine = new_engine(tiny_model_dir, max_batch_size=2, batch_share_per_owner=0.5)
    try:
        backlog = [ask(engine, "org-a", LONG) for _ in range(3)]
        next(backlog[0].deltas(), None)  # org-a is running
        victim = ask(engine, "org-b", 2)
        assert victim.result().completion_tokens == 2
        # org-b's request ran beside org-a's first one, not after org-a's backlog
        assert backlog[0].generation is None and backlog[2].generation is None
        for _ in range(100):  # the finished row leaves at the end of its step (bounded)
            mine = engine.stats(owner="org-b")["base_models"][0]
            if mine["running"] == 0:
                break
            threading.Event().wait(0.05)
        theirs = engine.stats(owner="org-a")["base_models"][0]
        assert (mine["running"], mine["waiting"]) == (0, 0)  # org-a's load is not shown
        assert mine["peak_batch"] == 1 and mine["steps"] < theirs["steps"]  # its own counts
        assert theirs["running"] + theirs["waiting"] == 3
    finally:
        for request in backlog:
            request.cancel()
        engine.close()


@pytest.mark.usefixtures("no_eos")
def test_an_organization_past_its_limit_is_refused_the_others_are_not(tiny_model_dir: Path) -> None:
    engine = new_engine(tiny_model_dir, max_requests_per_owner=2)
    try:
        held = [ask(engine, "org-a", LONG) for _ in range(2)]
        with pytest.raises(RateLimited) as refused:
            ask(engine, "org-a", 2)
        assert refused.value.retry_after >= 1
        assert ask(engine, "org-b", 2).result().completion_tokens == 2
        held[0].cancel()  # a slot frees as soon as one of its requests ends
        assert ask(engine, "org-a", 2).result().completion_tokens == 2
    finally:
        for request in held:
            request.cancel()
        engine.close()


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = prompt_input.tokenize

    def recording(tokenizer, prompt, messages, *rest):
        seen.append(len(prompt or "") + sum(len(m["content"]) for m in messages or []))
        return real(tokenizer, prompt, messages, *rest)

    monkeypatch.setattr(prompt_input, "tokenize", recording)
    engine = new_engine(tiny_model_dir)
    try:
        for inputs, param in [
            ({"prompt": "word " * 400_000}, "prompt"),
            ({"messages": [{"role": "user", "content": "word " * 400_000}]}, "messages"),
        ]:
            with pytest.raises(InvalidRequest) as refused:
                engine.submit(base_model="tiny", adapter=None, max_tokens=1, **inputs)
            assert refused.value.param == param
        assert seen == []  # no tokenizer ever saw the 2 MB text
    finally:
        engine.close()


def test_tokenizing_one_request_does_not_hold_up_another(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = prompt_input.tokenize

    def slow_for_one(tokenizer, prompt, *rest):
        if prompt == "slow":
            entered.set()
            release.wait(timeout=20)  # a huge prompt being tokenized
        return real(tokenizer, prompt, *rest)

    monkeypatch.setattr(prompt_input, "tokenize", slow_for_one)
    engine = new_engine(tiny_model_dir)
    ask(engine, "org-a", 1).result()  # loaded
    slow = threading.Thread(target=lambda: ask(engine, "org-a", 1, prompt="slow").result())
    quick = threading.Thread(target=lambda: ask(engine, "org-b", 2).result())
    try:
        slow.start()
        assert entered.wait(timeout=20)
        quick.start()
        quick.join(timeout=15)
        assert not quick.is_alive(), "org-b's request waited for org-a's tokenization"
        assert not release.is_set()
    finally:
        release.set()
        slow.join(timeout=20)
        quick.join(timeout=20)
        engine.close()
