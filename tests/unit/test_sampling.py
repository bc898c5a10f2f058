"""Batched sampling: each row draws from its own distribution with its own generator."""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")

from app.inference.sampling import Sampling, choose_tokens, make_generator  # noqa: E402

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def sampling(temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> Sampling:
    return Sampling(8, temperature, top_p, (), seed)


def draw(rows: list[Sampling], n: int, seed: int = 0) -> list[list[int]]:
    generators = [make_generator(seed + i, "cpu") for i in range(len(rows))]
    logits = LOGITS.repeat(len(rows), 1)
    return [choose_tokens(logits, list(zip(rows, generators, strict=True))) for _ in range(n)]


def test_each_row_follows_its_own_distribution() -> None:
    rows = [sampling(), sampling(top_p=0.6), sampling(temperature=0.0), sampling(top_p=0.85)]
    draws = draw(rows, 4000)
    full, nucleus, greedy, wider = (Counter(d[i] for d in draws) for i in range(4))
    for token, p in enumerate(PROBS.tolist()):
        assert abs(full[token] / 4000 - p) < 0.03, (token, full)
    assert set(nucleus) == {0, 1}  # 0.5 < 0.6: the prefix needs the second token
    assert abs(nucleus[0] / 4000 - 0.5 / 0.8) < 0.03
    assert set(greedy) == {0}
    assert set(wider) == {0, 1, 2}  # 0.8 < 0.85 <= 0.95


def test_a_seeded_row_draws_the_same_whatever_shares_the_batch() -> None:
    generator = make_generator(7, "cpu")
    row = sampling(seed=7)
    tokens_alone = [choose_tokens(LOGITS[None], [(row, generator)])[0] for _ in range(50)]
    generator, other = make_generator(7, "cpu"), make_generator(99, "cpu")
    batch = LOGITS.repeat(3, 1)
    rows = [(sampling(top_p=0.5), other), (sampling(temperature=0.0), other), (row, generator)]
    tokens_in_batch = [choose_tokens(batch, rows)[2] for _ in range(50)]
    assert tokens_in_batch == tokens_alone
