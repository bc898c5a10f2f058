"""Admission against the KV budget (issue 14, what finding 5 left): one organization cannot
fill the cache so that another's short request waits for its long rows to end.

The rules (`app/inference/admission.py`): while more than one organization has requests, one
may project at most its share of the budget; a request that does not fit the free cache is
passed over by later ones that do, at most `MAX_PASSES` admission rounds, then it reserves.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

import pytest

pytest.importorskip("torch")

from app.inference import InferenceEngine, kv_budget
from app.inference.admission import MAX_PASSES, fair_order, plan
from app.inference.kv import peak_cells
from app.inference.kv_budget import bytes_per_token
from app.inference.request import Request
from app.inference.sampling import Sampling
from app.inference.slabs import Row, Slab
from app.ml.loading import load_base_model
from tests.factories import ask_tiny

SHORT = "Once upon a time"  # 16 tokens (the tiny tokenizer spells characters)
LONG = 900  # max_tokens of the long requests: far more steps than the short ones need


def request(owner: str, prompt: int, max_tokens: int) -> Request:
    sampling = Sampling(max_tokens=max_tokens, temperature=0, top_p=1, stop=(), seed=None)
    return Request(adapter=None, input_ids=[0] * prompt, sampling=sampling, owner=owner)


def running(owner: str, cached: int, left: int) -> Slab:
    """A slab with one running row that caches `cached` tokens and may run `left` steps."""
    row = Row(request(owner, cached, left + 1), tracker=None, generator=None, produced=1)
    return Slab(kv=None, rows=[row])


def planned(slabs: list[Slab], order: list[Request], *, room: int, cap: int | None = None):
    new_slab = lambda: Slab(kv=None)  # noqa: E731
    return plan(slabs, order, rows=8, room=room, cap=cap, by_length=True, new_slab=new_slab)


def test_a_big_head_is_passed_over_by_a_smaller_request_that_fits() -> None:
    slabs = [running("a", 10, 99)]
    big, small = request("c", 50, 200), request("b", 5, 2)
    room = peak_cells([[(10, 99), (5, 1)]])  # the small one fits beside the running row
    result = planned(slabs, [big, small], room=room)
    assert [r for r, _ in result.joins] == [small] and result.no_room == [big]
    assert big.passed_over == 1  # counted once per round that started a request past it


def test_a_request_passed_over_max_passes_times_reserves_the_free_cache() -> None:
    slabs = [running("a", 10, 99)]
    big, small = request("c", 50, 200), request("b", 5, 2)
    room = peak_cells([[(10, 99), (5, 1)]])
    for round_ in range(MAX_PASSES):
        assert [r for r, _ in planned(slabs, [big, small], room=room).joins] == [small]
        assert big.passed_over == round_ + 1
    result = planned(slabs, [big, small], room=room)  # now nothing passes it
    assert result.joins == [] and result.no_room == [big]
    # once the running rows have ended it fits, and joins first
    assert [r for r, _ in planned([], [big, small], room=room * 10).joins] == [big, small]


def test_past_its_share_an_organization_waits_and_holds_no_one_up() -> None:
    slabs = [running("a", 16, 299)]
    second, other = request("a", 17, 300), request("b", 5, 2)
    budget = 4 * peak_cells([[(16, 299)]])
    result = planned(slabs, [second, other], room=budget, cap=budget // 4)
    assert result.over_share == [second] and [r for r, _ in result.joins] == [other]
    assert second.passed_over == 0  # past its share it waits for its own rows, reserves nothing
    # alone (no cap) it may use the cache it fits
    assert [r for r, _ in planned(slabs, [second], room=budget).joins] == [second]
    # its first row is never held to the share: what fits the budget can always run
    alone = planned([], [request("a", 16, 300)], room=budget, cap=1)
    assert len(alone.joins) == 1


def test_the_fair_order_lists_every_startable_request_in_turns() -> None:
    a1, a2, b1 = request("a", 1, 1), request("a", 1, 1), request("b", 1, 1)
    ready = {"a": deque([a1, a2]), "b": deque([b1])}
    assert fair_order(ready, [], per_owner=8, last_owner="a") == [b1, a1, a2]


# -- the probe, on the real engine ---------------------------------------------------------
def engine_with_cache(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, cells: int):
    per_token = bytes_per_token(load_base_model(tiny_model_dir, device="cpu"))
    monkeypatch.setattr(kv_budget, "free_bytes", lambda _device: int(cells * per_token / 0.5))
    return InferenceEngine(
        base_models={"tiny": str(tiny_model_dir)},
        device="cpu",
        kv_cache_fraction=0.5,
        kv_cache_org_share=0.5,
    )


def ask(engine: InferenceEngine, owner: str, max_tokens: int) -> Request:
    return ask_tiny(engine, owner=owner, prompt=SHORT, max_tokens=max_tokens)


def decode_steps(engine: InferenceEngine) -> int:
    """Decode steps so far: org A's long rows end after LONG of them."""
    return engine.stats()["base_models"][0]["steps"]


def extra_forwards(engine: InferenceEngine) -> int:
    """Decode forwards past one per decode step so far (a slab beyond the first costs one)."""
    state = engine.stats()["base_models"][0]
    return state["kv_cache"]["forwards"] - state["steps"]


def waiting_for_cache(engine: InferenceEngine, owner: str, count: int, running: int) -> dict:
    """`owner`'s view once `count` of its requests wait for cache beside `running` rows."""
    for _ in range(400):  # bounded: until the scheduler held them back and started the rest
        mine = engine.stats(owner=owner)["base_models"][0]
        if (mine["kv_cache"]["waiting_for_cache"], mine["running"]) == (count, running):
            return mine
        threading.Event().wait(0.005)
    raise AssertionError(f"{owner} never had {count} requests waiting for cache, {running} running")


@pytest.mark.usefixtures("no_eos", "one_torch_thread")
def test_an_organization_that_filled_the_cache_does_not_hold_up_another(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Org A alone fills the cache with long requests and has more waiting; org B's short
    requests, one after another, each start beside A's rows, not once they end."""
    long_row = peak_cells([[(len(SHORT), LONG - 1)]])
    # room for two long rows, not three: org A's third waits until one of them ends
    engine = engine_with_cache(tiny_model_dir, monkeypatch, 2 * long_row + long_row // 8)
    try:
        hog = [ask(engine, "org-a", LONG) for _ in range(2)]
        for stream in hog:
            next(stream.deltas())  # both running: alone, org A may use the whole cache
        hog.append(ask(engine, "org-a", LONG))
        waiting_for_cache(engine, "org-a", 1, running=2)
        for _ in range(3):  # each one's turn comes after org A's head, which does not fit
            assert ask(engine, "org-b", 2).result().completion_tokens == 2
        # every short request ran while org A's rows still ran: none waited for them to end
        assert decode_steps(engine) < LONG // 2
    finally:
        for stream in hog:
            stream.cancel()
        engine.close()


@pytest.mark.usefixtures("no_eos", "one_torch_thread")
def test_with_another_organization_present_one_holds_at_most_its_share(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_row = peak_cells([[(len(SHORT), LONG - 1)]])
    engine = engine_with_cache(tiny_model_dir, monkeypatch, 5 * long_row)
    try:
        present = ask(engine, "org-b", LONG)
        next(present.deltas())  # org B has a row: org A is not alone
        hog = [ask(engine, "org-a", LONG) for _ in range(4)]
        mine = waiting_for_cache(engine, "org-a", 2, running=2)  # its share: two long rows
        assert mine["kv_cache"]["reserved_tokens"] <= mine["kv_cache"]["budget_tokens"] // 2
        assert ask(engine, "org-b", 2).result().completion_tokens == 2  # room was kept
        assert decode_steps(engine) < LONG // 2  # beside org A's rows, not after them
    finally:
        for stream in [present, *hog]:
            stream.cancel()
        engine.close()


@pytest.mark.usefixtures("no_eos", "one_torch_thread")
def test_a_short_request_beside_a_long_row_decodes_as_alone(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5's cost: a 5-token completion beside another tenant's long row once opened a
    slab of its own, and every step then forwarded both slabs. Now its steps forward its
    own slab alone (`turns.py`), and it answers as alone."""
    engine = engine_with_cache(tiny_model_dir, monkeypatch, 20_000)
    try:
        quiet = ask(engine, "org-b", 5).result().text
        long = ask(engine, "org-a", LONG)
        for _ in range(2000):  # bounded: until it is far past the padding bound of a prompt
            if decode_steps(engine) >= 200:
                break
            threading.Event().wait(0.005)
        before = extra_forwards(engine)
        assert ask(engine, "org-b", 5).result().text == quiet
        # each of its 4 decode steps was one forward (both slabs each step would add 4; a
        # snapshot taken between a step's count and its forward may read one off)
        assert extra_forwards(engine) - before <= 1
    finally:
        long.cancel()
        engine.close()
