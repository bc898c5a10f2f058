"""The KV cache budget and the padding policy (issue 15, section 2, inference).

A request the budget cannot take yet waits in the queue and runs when cache frees; one that
could never fit is refused (400 naming max_tokens); rows of very different lengths decode in
separate slabs; in every case each greedy output equals the request run alone, and what the
slabs really allocated never passed the budget.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

from app.errors import InvalidRequest
from app.inference import InferenceEngine, kv_budget
from app.inference.kv import peak_cells
from app.inference.kv_budget import KvBudget, bytes_per_token
from app.inference.padding import (
    PAD_FREE_COLUMNS,
    PAD_SHARE,
    SHORT_ROW_STEPS,
    choose_slab,
    fits,
)
from app.ml.loading import load_base_model
from tests.factories import ask_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = "Once upon a time"  # 16 tokens (the tiny tokenizer spells characters)
LONG_PROMPT = "word " * 80  # 400 tokens: pads a short row far past the padding bound
FRACTION = 0.5


@pytest.fixture
def per_token(tiny_model_dir: Path) -> int:
    return bytes_per_token(load_base_model(tiny_model_dir, device="cpu"))


def budget_of(monkeypatch: pytest.MonkeyPatch, per_token: int, cells: int) -> None:
    """Make the memory free after loading such that the budget is `cells` cells."""
    monkeypatch.setattr(kv_budget, "free_bytes", lambda _device: int(cells * per_token / FRACTION))


def new_engine(tiny_model_dir: Path, **options) -> InferenceEngine:
    return InferenceEngine(
        base_models={"tiny": str(tiny_model_dir)},
        device="cpu",
        kv_cache_fraction=FRACTION,
        **options,
    )


def ask(engine: InferenceEngine, prompt: str, max_tokens: int, owner: str = "org-a"):
    return ask_tiny(engine, owner=owner, prompt=prompt, max_tokens=max_tokens)


def alone(tiny_model_dir: Path, jobs: list[tuple[str, int]]) -> list[str]:
    """Each job's greedy text, one at a time, on an engine with room to spare."""
    engine = new_engine(tiny_model_dir)
    try:
        return [ask(engine, prompt, tokens).result().text for prompt, tokens in jobs]
    finally:
        engine.close()


def info(engine: InferenceEngine, owner: str | None = None) -> dict:
    return engine.stats(owner=owner)["base_models"][0]


def test_bytes_per_token_follow_the_config(tiny_model_dir: Path) -> None:
    model = load_base_model(tiny_model_dir, device="cpu")
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # fp32
    assert bytes_per_token(model) == expected
    budget = KvBudget.measure(model, 0.25)
    assert 0 < budget.cells <= kv_budget.free_bytes(model.device) * 0.25 / expected + 1


def test_peak_cells_counts_padding_and_grows_with_each_row() -> None:
    one = peak_cells([[(100, 10)]])
    assert one >= 110  # the row's own reach at least
    # a short row beside it in one slab costs the long row's width, in its own far less
    shared = peak_cells([[(100, 10), (4, 10)]])
    apart = peak_cells([[(100, 10)], [(4, 10)]])
    assert shared - one >= 110 and apart - one < 40
    # a row that ends early frees its cells before the long one peaks
    early = peak_cells([[(100, 200), (100, 1)]])
    assert peak_cells([[(100, 200)]]) < early < peak_cells([[(100, 200), (100, 200)]])


def test_slabs_that_take_turns_may_all_peak_at_once() -> None:
    """A short slab may wait its turn (turns.py) while a growing one decodes to its end, so
    the projection is each slab's own peak summed. In lockstep the short one would have
    ended first, and the projection was ~100 cells short of what both can hold at once."""
    growing, ending = [(10, 100)], [(500, 5)]
    both = peak_cells([growing, ending])
    assert both == peak_cells([growing]) + peak_cells([ending])
    assert both >= (10 + 100) + (500 + 5)


def test_the_padding_bound_sends_far_apart_lengths_to_separate_slabs() -> None:
    assert fits([10, 40], 60)  # within the free columns
    assert not fits([8], 8 + PAD_FREE_COLUMNS + 1 + int(PAD_SHARE * 200))
    assert fits([300], int(300 * (1 - PAD_SHARE)))  # half the width of a long slab
    assert choose_slab([[400], [12]], 20, by_length=True) == 1
    assert choose_slab([[400]], 20, by_length=True) is None
    assert choose_slab([[400]], 20, by_length=False) == 0  # the old single slab
    # a row of a few decode steps joins past the bound (the cheapest slab), a longer one not
    assert choose_slab([[400], [300]], 20, by_length=True, steps=SHORT_ROW_STEPS) == 1
    assert choose_slab([[400]], 20, by_length=True, steps=SHORT_ROW_STEPS + 1) is None
    # past the bound only into its own organization's slabs (another's are another's turns)
    short = {"by_length": True, "steps": SHORT_ROW_STEPS}
    assert choose_slab([[400], [300]], 20, **short, own=[True, False]) == 0
    assert choose_slab([[400], [300]], 20, **short, own=[False, False]) is None


@pytest.mark.usefixtures("no_eos")
def test_a_request_past_the_free_budget_waits_then_both_answer_right(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, per_token: int
) -> None:
    first_job, second_job = (SHORT, 600), (SHORT + " again", 500)
    # room for the first alone; the second would still run when the first peaks
    budget_of(monkeypatch, per_token, peak_cells([[(len(SHORT), 599)]]))
    engine = new_engine(tiny_model_dir)
    try:
        first = ask(engine, *first_job)
        next(first.deltas())  # running
        second = ask(engine, *second_job, owner="org-b")
        for _ in range(400):  # bounded: until the scheduler held it back for cache
            if info(engine, "org-b")["kv_cache"]["waiting_for_cache"] == 1:
                break
            threading.Event().wait(0.005)
        else:
            raise AssertionError("the second request never waited for cache")
        assert info(engine, "org-a")["kv_cache"]["waiting_for_cache"] == 0  # org-b's, not a's
        texts = [second.result().text, first.result().text]
    finally:
        engine.close()
    state = info(engine)  # the scheduler has stopped: its counters are final
    assert state["peak_batch"] == 1  # never both at once: the second waited, did not fail
    assert state["kv_cache"]["peak_allocated"] <= state["kv_cache"]["budget_tokens"]
    assert texts == alone(tiny_model_dir, [second_job, first_job])


def test_a_request_that_could_never_fit_is_refused_naming_max_tokens(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, per_token: int
) -> None:
    budget_of(monkeypatch, per_token, 300)
    engine = new_engine(tiny_model_dir)
    try:
        with pytest.raises(InvalidRequest) as refused:
            ask(engine, SHORT, 400)
        assert refused.value.param == "max_tokens"
        assert "max_tokens 400" in str(refused.value) and "16 prompt tokens" in str(refused.value)
        assert ask(engine, SHORT, 100).result().completion_tokens > 0  # a smaller one runs
    finally:
        engine.close()


@pytest.mark.usefixtures("no_eos")
@pytest.mark.parametrize("by_length", [True, False])
def test_mixed_lengths_answer_as_alone_in_either_layout(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, per_token: int, by_length: bool
) -> None:
    jobs = [(LONG_PROMPT, 300), (SHORT, 12), (SHORT[:9], 30), (LONG_PROMPT[:205], 20)]
    budget_of(monkeypatch, per_token, 1200)  # binding: in one slab the short rows wait
    engine = new_engine(tiny_model_dir, kv_group_by_length=by_length)
    try:
        long = ask(engine, *jobs[0])
        next(long.deltas())  # the long row runs while the others join
        others = [ask(engine, prompt, tokens) for prompt, tokens in jobs[1:]]
        texts = [long.result().text] + [request.result().text for request in others]
    finally:
        engine.close()
    state = info(engine)  # the scheduler has stopped: its counters are final
    assert texts == alone(tiny_model_dir, jobs)
    cache = state["kv_cache"]
    assert cache["peak_allocated"] <= cache["budget_tokens"]
    # by length, the short rows decoded in their own slab (more forwards than steps) and
    # padded less of what was allocated; in one slab, every step was one forward
    assert (state["kv_cache"]["forwards"] > state["steps"]) == by_length


@pytest.mark.parametrize("seed", range(20))
def test_peak_cells_is_never_below_what_a_slab_really_allocates(seed: int) -> None:
    """The guarantee admission relies on: replay random rows through a real `BatchKV` (join,
    decode steps, rows leaving) and compare its allocation at every moment."""
    import random
    from types import SimpleNamespace

    import torch

    from app.inference.kv import BatchKV

    rng = random.Random(seed)
    rows = [(rng.randint(1, 300), rng.randint(1, 150)) for _ in range(rng.randint(1, 6))]
    kv = BatchKV(1, torch.device("cpu"))
    prefilled = [
        (SimpleNamespace(layers=[SimpleNamespace(keys=t, values=t)]), 0)
        for t in (torch.zeros(1, 1, cached, 1) for cached, _ in rows)
    ]
    left = [steps for _, steps in rows]
    kv.join(prefilled, max(left))
    seen = kv.rows * kv.capacity()
    while kv.rows:
        kv.advance(max(left) - 1)  # a decode step: one column more for every row
        seen = max(seen, kv.rows * kv.capacity())
        left = [steps - 1 for steps in left]
        kept = [index for index, steps in enumerate(left) if steps > 0]
        left = [left[index] for index in kept]
        kv.keep(kept, max(left, default=0))
        seen = max(seen, kv.rows * kv.capacity())
    assert seen <= peak_cells([rows])
