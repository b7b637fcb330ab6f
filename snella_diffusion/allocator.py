"""Competition across layers (docs/METHOD.md §3): the bi-level budget allocator.

The budget is a number of non-zero ΔW_eff entries. Each optimizer step the allocator updates
smoothed sensitivity Ī and uncertainty Ū of every factor entry; on reallocation steps it
shares the scheduled volume V(t) between layers in proportion to their scores and sets each
layer's sparsity. Budgets are Python ints, so Σ kept counts equals V(t) exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import SnellaConfig
from .errors import SnellaError
from .layer import SnellaAdapter, SnellaLinear, snella_layers
from .sparsify import drop_count_for


def distribute_budget(volume: int, scores: list[float], capacities: list[int]) -> list[int]:
    """Integer budgets ``alloc_l <= capacities[l]`` adding up to ``min(volume, Σ capacities)``.

    First floor(V·π_l) capped at the capacity, then the remainder is handed out again over the
    layers with spare room in proportion to π_l; the last few units go one each to the open
    layers with the highest π (ties: lower index first).
    """
    total_score = sum(scores)
    if total_score <= 0 or not math.isfinite(total_score):
        scores, total_score = [float(c) for c in capacities], float(sum(capacities))
    shares = [s / total_score for s in scores]
    alloc = [min(cap, math.floor(volume * share)) for cap, share in zip(capacities, shares)]
    remaining = min(volume, sum(capacities)) - sum(alloc)
    while remaining > 0:
        open_layers = [i for i, cap in enumerate(capacities) if alloc[i] < cap]
        open_share = sum(shares[i] for i in open_layers)
        if open_share <= 0:
            open_share = float(len(open_layers))
            weights = {i: 1.0 for i in open_layers}
        else:
            weights = {i: shares[i] for i in open_layers}
        grants = {
            i: min(capacities[i] - alloc[i], math.floor(remaining * weights[i] / open_share))
            for i in open_layers
        }
        if sum(grants.values()) == 0:
            for i in sorted(open_layers, key=lambda i: (-weights[i], i))[:remaining]:
                grants[i] = 1
        for i, grant in grants.items():
            alloc[i] += grant
            remaining -= grant
    return alloc


class BiLevelAllocator:
    """Adaptive per-layer sparsity driven by smoothed sensitivity × uncertainty.

    Call ``step()`` once per optimizer step, after backward and before the gradients are
    cleared (after ``optimizer.step()`` is fine: that is what ``skipped`` is for).

    Args:
        model: a model holding SnellaLinear layers, or a ``{name: SnellaLinear}`` dict.
        config: supplies init/target sparsity, β1, β2 and the schedule (t_i, t_f, Δ).
        total_steps: T, the number of optimizer steps of the run.
        adapter_name: which adapter of each layer to allocate (default: each layer's first
            active adapter).
    """

    def __init__(
        self,
        model: Union[nn.Module, dict[str, SnellaLinear]],
        config: SnellaConfig,
        total_steps: int,
        adapter_name: Optional[str] = None,
    ) -> None:
        layers = model if isinstance(model, dict) else snella_layers(model)
        if not layers:
            raise SnellaError("BiLevelAllocator: the model has no SnellaLinear layer")
        if total_steps < 1:
            raise SnellaError(f"total_steps={total_steps}: must be at least 1")
        self.config = config
        self.total_steps = int(total_steps)
        self.adapters: dict[str, SnellaAdapter] = {
            name: (layer.adapters[adapter_name] if adapter_name else layer.primary)
            for name, layer in layers.items()
        }
        self.names = list(self.adapters)
        self.capacities = [self.adapters[n].numel for n in self.names]
        self.initial_volume = sum(c - drop_count_for(config.init_sparsity, c) for c in self.capacities)
        self.final_volume = sum(c - drop_count_for(config.target_sparsity, c) for c in self.capacities)
        self.step_count = 0
        self.sensitivity: dict[str, list[Tensor]] = {}
        self.uncertainty: dict[str, list[Tensor]] = {}
        for name, adapter in self.adapters.items():
            factors = (adapter.in_factors, adapter.out_factors)
            self.sensitivity[name] = [torch.zeros_like(p, dtype=torch.float32) for p in factors]
            self.uncertainty[name] = [torch.zeros_like(p, dtype=torch.float32) for p in factors]
        for adapter in self.adapters.values():
            adapter.set_sparsity(config.init_sparsity)
        self.history_steps: list[int] = []
        self.history_kept: list[list[float]] = []
        self._record_history()

    def scheduled_volume(self, step: int) -> int:
        """V(t): the number of non-zero ΔW entries scheduled after optimizer step ``step``."""
        warmup, final = self.config.allocator_warmup_steps, self.config.allocator_final_steps
        if step <= warmup:
            return self.initial_volume
        span = self.total_steps - final - warmup
        if step > self.total_steps - final or span <= 0:
            return self.final_volume
        remaining = 1.0 - (step - warmup) / span
        volume = self.final_volume + (self.initial_volume - self.final_volume) * remaining**3
        return int(round(volume))

    def should_reallocate(self, step: int) -> bool:
        return step > self.config.allocator_warmup_steps and step % self.config.allocator_interval == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.importance_beta1, self.config.importance_beta2
        for name, adapter in self.adapters.items():
            for index, param in enumerate((adapter.in_factors, adapter.out_factors)):
                if param.grad is None:
                    importance = torch.zeros_like(self.sensitivity[name][index])
                else:
                    importance = (param.detach() * param.grad).abs().float()
                    importance = torch.nan_to_num(importance, nan=0.0, posinf=0.0, neginf=0.0)
                smoothed = self.sensitivity[name][index].mul_(beta1).add_(importance, alpha=1 - beta1)
                self.uncertainty[name][index].mul_(beta2).add_(
                    (importance - smoothed).abs_(), alpha=1 - beta2
                )

    @torch.no_grad()
    def layer_scores(self) -> list[float]:
        """S_l = mean(Ī⊙Ū over A_l) + mean(Ī⊙Ū over B_l), in ``self.names`` order.

        One device-to-host transfer for all layers. Under torch.distributed the scores of
        rank 0 are broadcast so every rank takes the same decisions.
        """
        per_layer = []
        for name in self.names:
            sens, unc = self.sensitivity[name], self.uncertainty[name]
            per_layer.append(sum((s * u).mean() for s, u in zip(sens, unc)))
        scores = torch.stack([s.to(torch.float64) for s in per_layer])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            shared = scores.to(backend_device)
            dist.broadcast(shared, src=0)
            scores = shared
        return scores.cpu().tolist()

    def step(self, skipped: bool = False) -> bool:
        """Account one optimizer step; returns True when the layers were reallocated.

        Args:
            skipped: the optimizer step was skipped (AMP found inf/NaN gradients): the step is
                not counted and the importance EMAs are left as they were.
        """
        if skipped:
            return False
        self.step_count += 1
        self._update_importance()
        if not self.should_reallocate(self.step_count):
            return False
        self.reallocate(self.scheduled_volume(self.step_count))
        return True

    def reallocate(self, volume: int) -> None:
        """Share ``volume`` kept entries between layers by score and set their sparsities."""
        alloc = distribute_budget(volume, self.layer_scores(), self.capacities)
        for name, capacity, kept in zip(self.names, self.capacities, alloc):
            drop = capacity - kept
            self.adapters[name].set_sparsity(drop / capacity, drop_count=drop)
        self._record_history()

    def _record_history(self) -> None:
        self.history_steps.append(self.step_count)
        self.history_kept.append([a.keep_count() / a.numel for a in self.adapters.values()])

    def budgets(self) -> dict[str, float]:
        """Current ``{layer name: sparsity}`` (fraction of ΔW entries set to zero)."""
        return {n: a.drop_count_host / a.numel for n, a in self.adapters.items()}

    def keep_counts(self) -> dict[str, int]:
        return {n: a.keep_count() for n, a in self.adapters.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: step, EMAs, drop counts, history."""
        return {
            "step_count": self.step_count,
            "names": list(self.names),
            "drop_counts": [self.adapters[n].drop_count_host for n in self.names],
            "sensitivity": {n: [t.clone() for t in v] for n, v in self.sensitivity.items()},
            "uncertainty": {n: [t.clone() for t in v] for n, v in self.uncertainty.items()},
            "history_steps": list(self.history_steps),
            "history_kept": [list(row) for row in self.history_kept],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            missing = sorted(set(self.names) - set(state["names"]))
            extra = sorted(set(state["names"]) - set(self.names))
            raise SnellaError(
                f"allocator state does not match the model's layers (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        self.step_count = int(state["step_count"])
        for name, drop in zip(self.names, state["drop_counts"]):
            adapter = self.adapters[name]
            adapter.set_sparsity(drop / adapter.numel, drop_count=int(drop))
        for target, source in ((self.sensitivity, state["sensitivity"]), (self.uncertainty, state["uncertainty"])):
            for name in self.names:
                for mine, theirs in zip(target[name], source[name]):
                    mine.copy_(theirs)
        self.history_steps = list(state["history_steps"])
        self.history_kept = [list(row) for row in state["history_kept"]]
