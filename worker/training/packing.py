"""Training sequences: examples one per row, or packed several per row without leaks.

Packing puts short examples side by side in one row of up to `max_seq_length` tokens.
It is exact — each example attends only to itself and its positions restart at 0 —
because transformers' mask builder (`masking_utils.find_packed_sequence_indices`)
turns restarting `position_ids` into a block-diagonal causal mask when no 2-D
attention mask and no KV cache are given (so every training forward passes
`use_cache=False`). `packing_is_exact` checks that a given model really does
that (logits of a packed row equal those of its examples run alone) before a job
turns packing on; models that ignore `position_ids` keep one example per row.

Under segment attention (`segment_attention.py`: causal attention per example, no mask)
a row's cost no longer grows with its width squared, so each micro-batch becomes one row
with no padding at all; otherwise rows hold up to `max_seq_length` tokens (the mask is
[W, W]). `row_length` makes that choice for the loop and the job's statistics.

Rows are right-padded to the widest row of their batch; padding positions also
restart at 0, so padding is a separate segment nobody attends to, and its labels
are IGNORE_INDEX. Unpacked rows keep one increasing position range, so the mask is
plain causal (real tokens precede the padding and never see it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from worker.training.data import IGNORE_INDEX, Example


@dataclass
class Sequence:
    """One training row: token ids, labels, positions and the examples it holds."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    example_ids: list[int]  # indices into the example list, in row order


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
