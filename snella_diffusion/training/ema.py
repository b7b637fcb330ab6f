"""One exponential moving average of trainable parameters, for both training scripts.

After the k-th optimizer step (k = 1, 2, ...) every tracked parameter p updates its average as

    ema ← d_k · ema + (1 - d_k) · p

- with ``warmup`` (DreamBooth ``--use_ema``): d_k = min(decay, k / (k + 9)) for k ≥ 2 and
  d_1 = 0, diffusers' ``EMAModel`` warm-up ``(1 + t) / (10 + t)`` with t = k - 1 (the first
  average is the parameter itself), computed as diffusers does, ``ema·d + p·(1 - d)``;
- without (classification ``--model_ema_decay``, the FGVC reference's ``--model-ema``):
  d_k = decay, computed as ``ema + (1 - d)·(p - ema)`` (``torch.lerp``).

Averages are float32 whatever the parameters' dtype. Frozen weights equal their average, so
only trainable parameters are tracked; buffers (SNELLA's sparsities and τ) are shared. The
state travels in accelerate checkpoints (``state_dict`` / ``load_state_dict``), so a resumed
run continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..errors import SnellaConfigError, SnellaError


def ema_decay_at(update: int, ema_decay: float) -> float:
    """d_k of the warm-up schedule for the ``update``-th update (1-based): 0 for the first,
    then min(ema_decay, k/(k+9))."""
    if update <= 1:
        return 0.0
    return min(ema_decay, update / (update + 9.0))


class ParameterEma:
    """Float32 moving averages of ``parameters``, in order, updated after each optimizer step.

    Attributes:
        parameters: the tracked parameters.
        decay: d, in (0, 1).
        warmup: follow diffusers' warm-up schedule (``ema_decay_at``) instead of a constant d.
        updates: number of ``update`` calls so far.
        averages: one float32 tensor per parameter, of its shape.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise SnellaConfigError(f"EMA decay={decay}: must lie in (0, 1)")
        self.parameters = list(parameters)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.averages = [p.detach().to(torch.float32, copy=True) for p in self.parameters]

    def decay_now(self) -> float:
        """d_k of the latest update."""
        return ema_decay_at(self.updates, self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameter values into the averages (call after an optimizer step)."""
        self.updates += 1
        decay = self.decay_now()
        for average, parameter in zip(self.averages, self.parameters):
            value = parameter.detach().float()
            if self.warmup:
                average.mul_(decay).add_(value, alpha=1.0 - decay)
            else:
                average.lerp_(value, 1.0 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Overwrite the parameters with their averages (in place: cached τ are re-selected)."""
        for average, parameter in zip(self.averages, self.parameters):
            parameter.copy_(average.to(parameter.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the averages in the parameters; the live values come back after."""
        live = [p.detach().clone() for p in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, live):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "ema_decay": self.decay, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averages: list[Tensor] = state["averages"]
        if len(averages) != len(self.averages) or any(a.shape != b.shape for a, b in zip(averages, self.averages)):
            raise SnellaError("--use_ema: the checkpoint's EMA does not match the adapters being trained")
        self.updates = int(state["updates"])
        self.decay = float(state["ema_decay"])
        self.averages = [a.to(b.device, torch.float32).clone() for a, b in zip(averages, self.averages)]


class AdapterEMA(ParameterEma):
    """The DreamBooth ``--use_ema`` average (its old name): ``ParameterEma`` with the warm-up."""

    def __init__(self, parameters: Iterable[nn.Parameter], ema_decay: float) -> None:
        super().__init__(parameters, ema_decay, warmup=True)
