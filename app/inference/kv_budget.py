"""The KV cache budget of one base model: how many cache cells its batches may hold.

`LORAFORGE_KV_CACHE_FRACTION` of the memory free once the base has loaded (CUDA: the device's
free memory; CPU: the system's available memory), like vLLM's `gpu_memory_utilization`; the
rest is headroom for activations, logits, a prefill's transient cache and other processes
(a training worker on the same machine). A cell is one token's keys and values in every
layer: 2 x layers x KV heads x head dim x the cache dtype's bytes.

Admission reserves, per row, everything it can reach: its prompt plus max_tokens, padding and
spare columns included (`kv.peak_cells`), so a running row never runs out of cache and
nothing is preempted. A request that does not fit waits in the queue; one that could not fit
even alone is refused up front. The base's scheduler and its PEFT-fallback schedulers share
one budget (they share the weights and the device), each holding what it projects.

`LORAFORGE_KV_CACHE_ORG_SHARE` of the budget is the most one organization's rows may project
while another organization also has requests on the scheduler (`share_cap`, `admission.py`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

from app.inference.kv import peak_cells

_MEMINFO = Path("/proc/meminfo")


def bytes_per_token(model: Any) -> int:
    """One token's keys and values across every layer, from the model's config."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # the embedding keeps the compute dtype even where a quantized base packs its linears
    itemsize = model.get_input_embeddings().weight.element_size()
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * itemsize)


def free_bytes(device: Any) -> int:
    """Memory free for the cache on `device`: CUDA's free memory, else available RAM."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # MemAvailable counts reclaimable page cache, as the kernel would hand it out
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class KvBudget:
    """Cache cells one base model's schedulers may hold together; thread-safe."""

    def __init__(
        self, *, cells: int, bytes_per_token: int, fraction: float, org_share: float = 1.0
    ) -> None:
        if not 0 < org_share <= 1:
            raise ValueError("an organization's share of the KV cache must be in (0, 1]")
        self.cells, self.bytes_per_token, self.fraction = cells, bytes_per_token, fraction
        self.org_share = org_share
        self._held: dict[int, int] = {}  # id(holder) -> the cells it projects at most
        self._lock = threading.Lock()

    @classmethod
    def measure(cls, model: Any, fraction: float, org_share: float = 1.0) -> KvBudget:
        """`fraction` of what is free now (call once the base's weights are loaded), of which
        one organization may hold `org_share` while others have requests too."""
        if not 0 < fraction <= 1:
            raise ValueError("the KV cache fraction must be in (0, 1]")
        per_token = bytes_per_token(model)
        free = free_bytes(next(model.parameters()).device)
        cells = int(free * fraction) // per_token
        return cls(cells=cells, bytes_per_token=per_token, fraction=fraction, org_share=org_share)

    def room_for(self, holder: object) -> int:
        """Cells `holder` may project in all: the budget less what the others hold."""
        with self._lock:
            return self.cells - sum(v for k, v in self._held.items() if k != id(holder))

    def share_cap(self, owners: Iterable[Hashable]) -> int | None:
        """Cells one organization's rows may project while `owners` have requests on a
        scheduler: its share when there is more than one, else None (it may use it all)."""
        return int(self.cells * self.org_share) if len(set(owners)) > 1 else None

    def hold(self, holder: object, cells: int) -> None:
        with self._lock:
            if cells:
                self._held[id(holder)] = cells
            else:
                self._held.pop(id(holder), None)

    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why one request could never be admitted, even alone (None: it can)."""
        need = peak_cells([[(prompt_tokens, max_tokens - 1)]])
        if need <= self.cells:
            return None
        return (
            f"this request needs up to {need} tokens of KV cache ({prompt_tokens} prompt tokens "
            f"+ max_tokens {max_tokens}, with the cache's spare columns), more than this "
            f"server's whole KV cache budget of {self.cells} tokens "
            "(LORAFORGE_KV_CACHE_FRACTION); lower max_tokens or shorten the prompt"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "budget_tokens": self.cells,
            "budget_bytes": self.cells * self.bytes_per_token,
            "bytes_per_token": self.bytes_per_token,
            "fraction": self.fraction,
            "org_share": self.org_share,
        }
