"""DPO learns, the usual recipe (bench/dpo_learning.py): SFT on both answers of every prompt,
then DPO against that adapter preferring one: the rejected answers become rare among the
greedy answers and the preferred-minus-rejected margin grows on held-out pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.dpo_learning import N_TRAIN, run_recipe


@pytest.mark.slow
def test_dpo_after_sft_makes_the_rejected_answers_rare(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    sft, dpo = run_recipe(tmp_path)
    print(f"\n{sft.line()}\n{dpo.line()}")
    assert sft.preferred + sft.rejected >= N_TRAIN // 2  # SFT taught both answers
    assert sft.rejected >= 2  # the rejected answer was a real habit before DPO
    assert dpo.rejected <= 1 and dpo.rejected < sft.rejected
    assert dpo.held_out_margin > sft.held_out_margin + 1.0
