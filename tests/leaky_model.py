"""A model that packing must refuse: it ignores position_ids, so packed examples see each
other (tests of packing's exactness check and of the chunked loss's fallback)."""

from __future__ import annotations

import torch


class LeakyLM(torch.nn.Module):
    """Every position sees the sum of all earlier embeddings, ignoring position_ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids, position_ids=None, use_cache=False):
        hidden = self.embed(input_ids).cumsum(dim=1)
        return type("Out", (), {"logits": self.head(hidden)})()
