"""Tensor accounting: the bytes of tensor storages alive at each moment, and their peak.

A ``TorchDispatchMode`` sees every tensor an ATen operator returns. Each storage is counted
once, from the first tensor that shows it until the last tensor object that showed it dies
(weak references; PyTorch keeps a tensor's Python object alive while C++, e.g. autograd,
still holds the tensor). Tensors made before the mode was entered (a model built outside it)
are not counted. CPU memory is what this measures where ``torch.cuda.max_memory_allocated``
is not available; allocator caching and fragmentation are not part of it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as account: ...``; then ``account.peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [tensor objects alive, bytes]
        self.live = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.storages[key]
            self.live -= entry[1]

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0 or size == 0:
            return
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [0, size]
            self.live += size
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return output
