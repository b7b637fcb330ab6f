"""``--use_ema``: an exponential moving average of the adapter parameters.

After the k-th optimizer step (k = 1, 2, ...) every tracked parameter p updates its average as

    ema ← d_k · ema + (1 - d_k) · p,     d_k = min(ema_decay, k / (k + 9)) for k ≥ 2,  d_1 = 0

(diffusers' ``EMAModel`` warm-up ``(1 + t) / (10 + t)`` with t = k - 1, and ``d_1 = 0``: the
first average is the parameter itself). The state travels in accelerate checkpoints
(``state_dict`` / ``load_state_dict``), so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


def ema_decay_at(update: int, ema_decay: float) -> float:
    """d_k for the ``update``-th update (1-based): 0 for the first, then min(ema_decay, k/(k+9))."""
    if update <= 1:
        return 0.0
    return min(ema_decay, update / (update + 9.0))


class AdapterEMA:
    """Float32 moving averages of ``parameters`` (the trainable adapter tensors), in order."""

    def __init__(self, parameters: Sequence[nn.Parameter], ema_decay: float) -> None:
        self.parameters = list(parameters)
        self.ema_decay = ema_decay
        self.updates = 0
        self.averages = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameter values into the averages (call after an optimizer step)."""
        self.updates += 1
        decay = ema_decay_at(self.updates, self.ema_decay)
        for average, parameter in zip(self.averages, self.parameters):
            average.mul_(decay).add_(parameter.detach().float(), alpha=1.0 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Overwrite the parameters with their averages (in place: cached τ are re-selected)."""
        for average, parameter in zip(self.averages, self.parameters):
            parameter.copy_(average.to(parameter.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "ema_decay": self.ema_decay, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averages: list[Tensor] = state["averages"]
        if len(averages) != len(self.averages) or any(a.shape != b.shape for a, b in zip(averages, self.averages)):
            from ..errors import SnellaError

            raise SnellaError("--use_ema: the checkpoint's EMA does not match the adapters being trained")
        self.updates = int(state["updates"])
        self.ema_decay = float(state["ema_decay"])
        self.averages = [a.to(b.device, torch.float32).clone() for a, b in zip(averages, self.averages)]
