"""Peak training memory of one method: measured on CUDA, accounted tensor by tensor elsewhere.

On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) is exact. On CPU no allocator
statistics exist, and the process's peak RSS never goes down, so runs of several methods in one
process cannot be told apart from it; there the entry reports an account of the tensors a
training step holds at its peak: parameters + gradients + optimizer state + the tensors autograd
saves for backward + method state (masks, allocator EMAs). ``benchmarks/
bench_classification_memory.py`` measures real peak RSS, one fresh process per method.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class SavedTensorMeter:
    """Bytes of distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.parameter_storages = {_storage_key(p) for p in model.parameters() if p.device.type != "meta"}
        self.saved: dict[tuple[int, int], int] = {}

    @contextmanager
    def recording(self) -> Iterator["SavedTensorMeter"]:
        def pack(tensor: Tensor) -> Tensor:
            if tensor.device.type != "meta":
                key = _storage_key(tensor)
                if key not in self.parameter_storages:
                    self.saved[key] = key[1]
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield self

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients of trainable parameters + optimizer state tensors, in bytes."""
    params = tensor_bytes(model.parameters())
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    state = sum(tensor_bytes(s.values()) for s in optimizer.state.values())
    return params + grads + state
