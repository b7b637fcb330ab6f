"""A model EMA over the trainable parameters: θ_ema ← d·θ_ema + (1 − d)·θ after every step.

The FGVC reference runs (``train_alloc_ema.py --model-ema --model-ema-decay=0.9999``) keep one
and report the best test top-1 of the model and of its EMA. Frozen weights equal their EMA, so
only the trainable parameters are tracked; buffers (SNELLA's sparsities and τ) are shared.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class ParameterEma:
    """Float32 shadow copies of ``parameters`` updated with ``decay`` after each optimizer step."""

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model EMA decay={decay}: must lie in (0, 1)")
        self.decay = decay
        self.parameters = list(parameters)
        self.shadows = [p.detach().to(torch.float32, copy=True) for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """θ_ema ← decay·θ_ema + (1 − decay)·θ for every tracked parameter."""
        for shadow, param in zip(self.shadows, self.parameters):
            shadow.lerp_(param.detach().to(torch.float32), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the EMA values in the parameters; the live ones come back after."""
        live = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for param, shadow in zip(self.parameters, self.shadows):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, live):
                    param.copy_(value)
