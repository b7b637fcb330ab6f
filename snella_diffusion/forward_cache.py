"""W0 + ΔW_eff kept from a training forward for the gradient-checkpointing recompute and the
backward, within a memory budget (``SnellaConfig.forward_cache_mb``).

Under gradient checkpointing a layer's weight is built three times per step: in the forward,
in the recompute just before its backward, and in the backward. The first two are identical
(same parameters, same τ), and the backward needs the same matrix again for the input
gradient. Keeping it from the forward to the backward skips the recompute's build and the
backward's merge with W0, at the price of holding the matrix meanwhile: the cache trades
memory for time, up to the budget. In a forward, a new matrix evicts the oldest entries when
the budget is full, so the cache ends up holding the layers the backward reaches first and
frees soonest (which keeps them out of the memory peak deeper in the backward); inside a
backward (the recompute) nothing is evicted. An entry is keyed on the adapter's
parameter versions, its sparsity, the scale, the dtype and the base weight's version, so an
optimizer step or any other change makes it a miss; the backward drops the entry it used.

Lifetime: one cache per process, ``kept_weights``, shared by every SNELLA layer, because the
budget is one figure over all layers being trained. An entry lives from a layer's forward to
its backward; ``remove_snella`` empties the cache (``clear``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _size(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ForwardCache:
    """Matrices by adapter (at most one each, in insertion order) and the bytes they hold."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, Tensor]] = {}
        self._held_bytes = 0

    def lookup(self, adapter: nn.Module, key: tuple) -> Optional[Tensor]:
        """The matrix stored for ``adapter`` under ``key``, or None."""
        entry = self._entries.get(id(adapter))
        return entry[1] if entry is not None and entry[0] == key else None

    def store(self, adapter: nn.Module, key: tuple, matrix: Tensor, budget_bytes: int, evict_older: bool) -> bool:
        """Keep ``matrix`` for ``adapter`` within ``budget_bytes``, evicting the oldest entries to
        make room when ``evict_older``; an older entry of the same adapter is replaced. Returns
        whether it was kept."""
        self.drop(adapter)
        size = _size(matrix)
        while evict_older and self._entries and self._held_bytes + size > budget_bytes:
            oldest_key, (_, oldest) = next(iter(self._entries.items()))
            del self._entries[oldest_key]
            self._held_bytes -= _size(oldest)
        if self._held_bytes + size > budget_bytes:
            return False
        self._entries[id(adapter)] = (key, matrix)
        self._held_bytes += size
        return True

    def drop(self, adapter: nn.Module) -> None:
        """Forget ``adapter``'s entry, if any."""
        entry = self._entries.pop(id(adapter), None)
        if entry is not None:
            self._held_bytes -= _size(entry[1])

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._held_bytes = 0

    def held_bytes(self) -> int:
        """Memory held by cached matrices, in bytes."""
        return self._held_bytes


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpoint recompute runs in one)."""
    return torch._C._current_graph_task_id() != -1


kept_weights = ForwardCache()
