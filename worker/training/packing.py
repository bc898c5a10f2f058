"""Training batches: which examples each optimizer step trains on, in what rows — one
example per row, or packed several per row without leaks.

A step is `gradient_accumulation_steps` micro-batches of `batch_size` items, taken in the
order of its epoch: a pure function of (seed, epoch), so a resumed run replays the same steps
(`steps`). An item is one example, or for DPO a preference pair: consecutive examples
(chosen, rejected) that are shuffled, batched and packed together (`EXAMPLES_PER_ITEM`).
The loop trains on these rows and the job runner counts them; both take them from here.

Packing puts short examples side by side in one row of up to `max_seq_length` tokens.
It is exact — each example attends only to itself and its positions restart at 0 —
because transformers' mask builder (`masking_utils.find_packed_sequence_indices`)
turns restarting `position_ids` into a block-diagonal causal mask when no 2-D
attention mask and no KV cache are given (so every training forward passes
`use_cache=False`). `packing_is_exact` checks that a given model really does
that (logits of a packed row equal those of its examples run alone) before a job
turns packing on (`enable_packing`); models that ignore `position_ids` keep one example
per row.

Under segment attention (`segment_attention.py`: causal attention per example, no mask)
a row's cost no longer grows with its width squared, so each micro-batch becomes one row
with no padding at all; otherwise rows hold up to `max_seq_length` tokens (the mask is
[W, W]). `row_length` makes that choice from the model's attention.

Rows are right-padded to the widest row of their batch; padding positions also
restart at 0, so padding is a separate segment nobody attends to, and its labels
are IGNORE_INDEX. Unpacked rows keep one increasing position range, so the mask is
plain causal (real tokens precede the padding and never see it).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from app.jobs.spec import SupervisedHyperparameters
from worker.training.data import IGNORE_INDEX, Example


@dataclass
class Sequence:
    """One training row: token ids, labels, positions and the examples it holds."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    example_ids: list[int]  # indices into the example list, in row order


@dataclass
class Step:
    """One optimizer step's training data: the rows of each of its micro-batches.

    Under data parallelism (`distributed.py`) the micro-batches are this rank's share; the
    other fields always describe the whole step, on every rank."""

    epoch: int  # 1-based
    micro_batches: list[list[Sequence]]
    ends_epoch: bool
    batch_count: int  # micro-batches of the step: how far it moves the data position
    example_ids: tuple[int, ...]  # the step's examples, in epoch order
    label_count: int  # label tokens of the step: its loss is their mean
    token_count: int  # tokens of the step (no padding)


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def count_steps(n_examples: int, hp: SupervisedHyperparameters) -> int:
    """Optimizer steps of a run: packing or not, a step is the same examples."""
    micro_batches = math.ceil(n_examples // hp.EXAMPLES_PER_ITEM / hp.batch_size)
    return hp.n_epochs * math.ceil(micro_batches / hp.accumulation)


def steps(
    examples: list[Example],
    hp: SupervisedHyperparameters,
    *,
    max_len: int | None,
    epoch: int = 1,
    next_batch: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Step]:
    """Every optimizer step from micro-batch `next_batch` of `epoch` to the end of training.

    The rows are built a step at a time: packing (when on) puts each micro-batch's examples
    in as few rows of up to `max_len` tokens as fit (`row_length`), so a step trains on
    exactly the examples it would unpacked — same loss, less padding.
    rank, world: train only this rank's share of each step (`rank_share`)."""
    for current in range(epoch, hp.n_epochs + 1):
        start = next_batch if current == epoch else 0
        for step in epoch_steps(examples, hp, max_len=max_len, epoch=current, start=start):
            yield step if world == 1 else rank_share(step, examples, hp, max_len, rank, world)


def epoch_steps(
    examples: list[Example],
    hp: SupervisedHyperparameters,
    *,
    max_len: int | None,
    epoch: int,
    start: int = 0,
) -> Iterator[Step]:
    """The optimizer steps of one epoch, from its micro-batch `start` on."""
    unit = hp.EXAMPLES_PER_ITEM
    order = epoch_order(len(examples) // unit, seed=hp.seed, epoch=epoch)
    batches = [
        [item * unit + k for item in order[i : i + hp.batch_size] for k in range(unit)]
        for i in range(0, len(order), hp.batch_size)
    ]
    accumulate = hp.accumulation
    for first in range(start, len(batches), accumulate):
        group = batches[first : first + accumulate]
        chosen = [i for indices in group for i in indices]
        yield Step(
            epoch=epoch,
            micro_batches=[
                build_sequences(examples, packing=hp.packing, max_len=max_len, indices=indices)
                for indices in group
            ],
            ends_epoch=first + len(group) >= len(batches),
            batch_count=len(group),
            example_ids=tuple(chosen),
            label_count=sum(labels_used(examples[i].labels) for i in chosen),
            token_count=sum(len(examples[i].input_ids) for i in chosen),
        )


def rank_share(
    step: Step,
    examples: list[Example],
    hp: SupervisedHyperparameters,
    max_len: int | None,
    rank: int,
    world: int,
) -> Step:
    """Rank `rank`'s part of `step`: every `world`-th of its examples, in micro-batches of
    at most `batch_size`. The ranks together train exactly the step's examples, each at
    most a single process's micro-batch at a time; a rank may get none (it idles)."""
    mine = list(step.example_ids[rank::world])
    groups = [mine[i : i + hp.batch_size] for i in range(0, len(mine), hp.batch_size)]
    micro_batches = [
        build_sequences(examples, packing=hp.packing, max_len=max_len, indices=group)
        for group in groups
    ]
    return replace(step, micro_batches=micro_batches)


def labels_used(labels: list[int]) -> int:
    """Label tokens the shifted loss uses (the first position is never a target; packed
    examples keep that, `_row`), so a step's count is its examples' sum."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def enable_packing(model: Any) -> bool:
    """Prepare `model` to train packed rows: switch it to segment attention where it can
    (`segment_attention.py`), then check that packing is exact with the attention that will
    train. False: train one example per row."""
    from worker.training.segment_attention import use_segment_attention

    use_segment_attention(model)
    return packing_is_exact(model)


def row_length(model: Any, max_seq_length: int) -> int | None:
    """The longest packed row for `model`: None (no limit: one row per micro-batch) where it
    runs segment attention, else `max_seq_length`."""
    from worker.training.segment_attention import NAME

    return None if model.config._attn_implementation == NAME else max_seq_length


def build_sequences(
    examples: list[Example],
    *,
    packing: bool,
    max_len: int | None,
    indices: list[int] | None = None,
) -> list[Sequence]:
    """Rows for `examples[i] for i in indices` (default: all), in that order.

    One row per example, or (packing) best-fit-decreasing bins of up to `max_len` tokens
    (`max_len` None: all of them in one row).
    """
    chosen = list(range(len(examples))) if indices is None else list(indices)
    if not packing:
        return [_row([i], examples) for i in chosen]
    if max_len is None:
        return [_row(chosen, examples)] if chosen else []
    rank = {i: k for k, i in enumerate(chosen)}
    order = sorted(chosen, key=lambda i: (-len(examples[i].input_ids), rank[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: best fit by bisect
    for i in order:
        size = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, index = free.pop(at)
            bins[index].append(i)
        else:
            index, space = len(bins), max_len
            bins.append([i])
        if space - size > 0:
            bisect.insort(free, (space - size, index))
    return [_row(members, examples) for members in bins]


def _row(members: list[int], examples: list[Example]) -> Sequence:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i in members:
        example = examples[i]
        ids += example.input_ids
        # The first token of each example has no predecessor inside its segment: never a
        # label target across the boundary (the loss shifts by one).
        labels += [IGNORE_INDEX, *example.labels[1:]] if positions else example.labels
        positions += range(len(example.input_ids))
    return Sequence(ids, labels, positions, members)


def collate(rows: list[Sequence], pad_token_id: int, device: Any) -> dict[str, Any]:
    """Right-pad rows into tensors: input_ids, labels, position_ids (see the module doc)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        k = len(row.input_ids)
        input_ids[n, :k] = torch.tensor(row.input_ids)
        labels[n, :k] = torch.tensor(row.labels)
        position_ids[n, :k] = torch.tensor(row.position_ids)
        packed = len(row.example_ids) > 1
        position_ids[n, k:] = torch.arange(width - k) + (0 if packed else k)
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "position_ids": position_ids.to(device),
        "real_tokens": sum(len(r.input_ids) for r in rows),
    }


def packing_is_exact(model: Any, *, atol: float = 1e-3) -> bool:
    """Does `model` isolate packed examples? Logits of a packed row vs each example alone."""
    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 7), generator=generator).to(device)
    second = torch.randint(0, vocab, (1, 5), generator=generator).to(device)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
            alone = torch.cat(
                [
                    model(input_ids=first, use_cache=False).logits,
                    model(input_ids=second, use_cache=False).logits,
                ],
                dim=1,
            )
    except TypeError:  # the model does not take position_ids at all
        return False
    finally:
        model.train(was_training)
    return bool((together.float() - alone.float()).abs().max() <= atol)
